"""Small helpers shared by every stage: atomic files, hashing, run metadata."""
