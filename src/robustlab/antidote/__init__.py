"""Antidote: post-fine-tuning safety re-alignment of Hugging Face LLMs by one-shot Wanda pruning."""
