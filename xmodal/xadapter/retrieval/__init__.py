"""Where the visual input comes from: the image bank (build, index, search) and the per-batch CLIP
context built from retrieved images and from the text (papers.md A.5)."""
