"""Pool search: a faiss index of a scan's image embeddings, queried by seed images, and pool-wide
near-duplicate groups. Torch-free; needs ``pip install waterdrop[scan]``."""
