"""Writing what real engines load: GGUF with a type per tensor, plain Hugging Face folders."""
