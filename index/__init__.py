"""Keep references and find neighbours: datasets -> LanceDB store -> FAISS index."""
