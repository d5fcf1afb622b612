"""Hardware targets of femtocc (spu001 arrives with its target description and code generator)."""
