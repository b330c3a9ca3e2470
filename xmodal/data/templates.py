"""Zero-shot prompt templates (the Tip-Adapter/CoOp lineage's choices, plus CLIP's CIFAR-10 set)."""

SIMPLE = ["a photo of a {}."]

IMAGENET_7 = [
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
]

# CLIP's published CIFAR-10 prompt ensemble (Radford et al., 2021, notebook "Prompt_Engineering_for_ImageNet").
CIFAR = [
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
    "a blurry photo of the {}.", "a black and white photo of the {}.", "a low contrast photo of the {}.",
    "a high contrast photo of the {}.", "a bad photo of the {}.", "a good photo of the {}.",
    "a photo of the small {}.", "a photo of the big {}.",
]

FASHION = ["a photo of a {}, a type of clothing.", "a photo of a {}."]

DIGITS = ['a photo of the number: "{}".']
