"""The X-adapter itself: its config, the expert modules and their injection into a PLM, MLM masking,
and loading the PLM (papers.md A.4, A.6)."""
