"""Turn photos into answers: encoders, embedding pipeline, kNN vote, identification."""
