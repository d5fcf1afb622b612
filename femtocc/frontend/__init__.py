"""Frontends: Whisper weights in (CTranslate2 packages, Hugging Face folders), ONNX out and in."""
