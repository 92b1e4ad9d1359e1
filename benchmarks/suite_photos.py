"""More real photographs for the benchmark suite, shipped in pinned Debian bookworm packages and PyPI wheels.

An allow-list in the same format as ``real_photos.PACKAGES`` / ``real_photos.PHOTOS``, holding only photos that
are not already there (not the same photo in another package either). Every file listed was looked at by hand
and is a real colour photograph of a real scene, object, person or animal, at least 224 px on the short side.
``kphotoalbum``, ``puzzle-jigsaw`` and ``qtdeclarative5-examples`` are Architecture: amd64 (``*_amd64.deb``);
the others are ``all``. Fetch debs with ``apt-get download PKG=VERSION`` and wheels with
``pip download --no-deps DIST==VERSION`` (the matplotlib wheel is per platform; the sample photo is in all).

Left out on purpose, after looking: screenshots, renders, drawings and logos (plasma wallpapers not yet used,
marble, fotoxx, scribus splash, Qt ads); paintings and photos that a mural fills; textures and surface
close-ups (bark, mudstone, leaves, brick walls, water spray); greyscale or nearly greyscale photos (lxqt beam);
astronomy images and composites (tuxmath and tuxtype space backgrounds, Moon); filtered, recoloured or
composited copies (all GIMP filter outputs, tone-mapped results, Scratch's edited backgrounds, cut-outs on
black); scanned prints with a border (kphotoalbum spiff, spiff_2); photos turned sideways without an EXIF tag;
panorama tiles with masked-out skies (stellarium); photos under 224 px; a second shot of a scene already in
(bar55_2, grand_canyon_3, city-with-water, village, the-movies); and photos that alone would need a very large
package (stellarium-data, inkscape).
"""

from __future__ import annotations

# package -> (version, licence as read from the package's copyright file); only packages new to real_photos.
PACKAGES: dict[str, tuple[str, str]] = {
    "kphotoalbum": ("5.9.1-1", "GPL-2+"),
    "lxqt-themes": ("1.2.0-1", "LGPL-2.1+ (wallpapers fall under Files: *)"),
    "tuxpaint-data": ("1:0.9.28-sdl2-1", "GPL-2+"),
    "tuxtype-data": ("1.8.3-5.1", "GPL-2; README_IMAGES: own GPL images or public-domain NOAA/FWS photos"),
    "gimp-help-en": ("2.10.34-2", "GFDL-NIV-1.2+ (copyright in gimp-help-common)"),
    "scribus-template": ("1.2.4.1-6", "public domain (templates br2, cal2, menu2 by Riku Leino)"),
    "qtdeclarative5-examples": ("5.15.8+dfsg-3", "BSD-3-Clause (examples/*)"),
    "hugin-data": ("2022.0.0+dfsg-2", "GPL-2+"),
    "afterstep-data": ("2.2.12-15", "GPL-2+"),
    "sddm-theme-maldives": ("0.19.0-5", "CC-BY-3.0 (background.jpg by Nevit Dilmen)"),
    "digikam-data": ("4:7.9.0-1", "GPL-2+"),
    "puzzle-jigsaw": ("1.0.2+git20201007.527c529+dfsg-4+b1", "CC0-1.0 (samples/*, from Pexels)"),
    "python-kivy-examples": ("2.1.0-1", "MIT (Expat)"),
    "scratch": ("1.4.0.6~dfsg1-6.1", "CC-BY-SA-3.0 (Media/*, MIT Scratch team)"),
}

_KPA = ("anne_helene", "bar55", "blackie", "cold_water", "donna", "donna_2", "grand_canyon_2", "jesper", "jesper_2",
        "new_wave_2", "pool", "qt-logo", "skagen", "skagen_2", "snow", "sunset")
_TUXPAINT = ("cliff", "corn_maze", "jellyfish", "lighthouse", "mossy_log", "ocean_waves", "redwoods_above", "rocks",
             "sheep", "spiders_web", "sun_behind_clouds", "sun_behind_leaves", "trees_above", "trees_at_dusk",
             "wool_mill_machine")
_SCRATCH = (
    *(f"Indoors/{name}" for name in ("kitchen", "the-movies-inside")),
    *(f"Nature/{name}" for name in ("beach-malibu", "canyon", "flower-bed", "garden-rock", "grand-canyon",
                                    "gravel-desert", "hill", "lake", "pathway", "tree", "water-and-rocks", "wave")),
    *(f"Outdoors/{name}" for name in ("atom-playground", "bench-with-view", "building-at-mit", "building-fireproof",
                                      "castle", "city-with-water2", "driveway", "hallway_outdoors", "houses",
                                      "parking-ramp", "pool", "route66", "silos", "train-tracks1", "train-tracks2",
                                      "wooden-house")),
    *(f"Sports/{name}" for name in ("baseball-field", "football-field", "playing-field")),
)

# package -> (folder inside the package, photo files under it).
PHOTOS: dict[str, tuple[str, tuple[str, ...]]] = {
    "kphotoalbum": ("usr/share/kphotoalbum/demo", tuple(f"{name}.jpg" for name in _KPA)),
    "lxqt-themes": ("usr/share/lxqt/wallpapers", (
        "Butterfly-Kenneth-Wimer.jpg", "Valendas.png", "after-the-rain.jpg", "appleflower.png", "butterfly.png",
        "cloud.png", "drop.png", "flowers.png", "fog.jpg", "this-is-not-windows.jpg")),
    "tuxpaint-data": ("usr/share/tuxpaint", (
        *(f"templates/{name}.jpg" for name in _TUXPAINT), "starters/reef-back.png")),
    "tuxtype-data": ("usr/share/tuxtype/images", ("hidden.jpg", *(f"kcas{i}.jpg" for i in range(12)))),
    # Originals only: the unfiltered source of each example, never a filtered or tone-mapped result.
    "gimp-help-en": ("usr/share/gimp/2.0/help/en/images", (
        "filters/examples/blur/mean_curvature-ex-1.jpg", "filters/examples/colors-retinex1.png",
        "filters/examples/kvitveis-orig.png", "filters/examples/light-and-shadow/vignette-ex-orig.jpg",
        "filters/examples/taj_orig.png", "tutorials/quickie-crop-example-source.jpg",
        "tutorials/quickie-flip-example-source.jpg", "tutorials/quickie-remove-background-source.jpg",
        "tutorials/quickie-rotate-example-source.jpg", "tutorials/tone-mapping/apple-orchard-truck-from-camera.jpg",
        "tutorials/tone-mapping/before-auto-stretch-contrast.jpg", "using/duck_orig.png", "using/keyfob_orig.png")),
    "scribus-template": ("usr/share/scribus/templates", (
        "br2/nature.jpg", "br2/sunset.jpg", "cal2/moon.jpg", "menu2/pizza.jpg")),
    "qtdeclarative5-examples": ("usr/lib/x86_64-linux-gnu/qt5/examples/quick", (
        "customitems/scrollbar/pics/niagara_falls.jpg",)),
    "hugin-data": ("usr/share/hugin/xrc/data/help_en_EN", ("CA_fringes00.jpg", "CA_tCA00.jpg")),
    "afterstep-data": ("usr/share/afterstep/desktop/tiles", ("rose512.jpg",)),
    "sddm-theme-maldives": ("usr/share/sddm/themes/maldives", ("background.jpg",)),
    "digikam-data": ("usr/share/digikam/about/images", ("body-background.jpg",)),
    "puzzle-jigsaw": ("usr/share/puzzle-jigsaw/samples", ("pexels-photo-302304.jpeg",)),
    "python-kivy-examples": ("usr/share/kivy-examples", (
        "demo/pictures/images/Wall.jpg", "demo/pictures/images/faust_github.jpg", "widgets/cityCC0.png")),
    "scratch": ("usr/share/scratch/Media/Backgrounds", tuple(f"{name}.jpg" for name in _SCRATCH)),
}

# PyPI distribution -> (version, licence, folder inside the wheel, photo files under it).
WHEELS: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "matplotlib": ("3.11.2", "Matplotlib License (PSF-based)", "matplotlib/mpl-data/sample_data",
                   ("grace_hopper.jpg",)),
    "imgaug": ("0.4.0", "MIT", "imgaug", ("quokka.jpg",)),
}
