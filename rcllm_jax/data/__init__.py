"""MovieLens readers, leave-one-out splits, candidate sampling, block-structured prompts."""
