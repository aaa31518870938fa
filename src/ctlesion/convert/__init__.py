"""Reading and converting the original author's checkpoints."""
