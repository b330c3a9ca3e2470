"""The layer order of the package, lowest first: a module may import its own layer or lower ones, never a
higher one, and no import circle may form (``tests/test_layers.py`` reads every import, including those
inside functions, and enforces both).

Each entry names whole packages or modules, so a new file falls into its package's layer; a new
top-level module must be placed here before the test passes.

  core          errors, atomic key-addressed files and the default cache folder, JSON, version, shards
  data          datasets, splits, samplers
  encoders      what a model is: towers, preprocessing, fingerprint (no engine, no cache)
  engines       how a tower runs: PyTorch, ONNX Runtime export/verification/fallback, bf16, int8
  backbones     an encoder put on an engine (``load_backbone``)
  features      extraction and its cache: backbone + engine + dataset + cache; zero-shot heads
  methods       few-shot methods over cached features
  classifier    the fitted, saved, reloaded classifier
  applications  benchmark harness, HTTP service, X-adapter, demo, CLI helpers
  cli           the command line and the package root (which re-exports the public API)
"""
from __future__ import annotations

ROOT = "xmodal"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("xmodal.errors", "xmodal.cache", "xmodal.filemode", "xmodal.jsonio", "xmodal.version",
              "xmodal.featureset", "xmodal.shards", "xmodal.extras", "xmodal.progress", "xmodal.layers")),
    ("data", ("xmodal.data",)),
    ("encoders", ("xmodal.encoders",)),
    ("engines", ("xmodal.engines",)),
    ("backbones", ("xmodal.backbones",)),
    ("features", ("xmodal.features", "xmodal.prefetch", "xmodal.tensor_decode", "xmodal.zeroshot",
                  "xmodal.feature_bank")),
    ("methods", ("xmodal.fewshot",)),
    ("classifier", ("xmodal.classifier",)),
    ("applications", ("xmodal.bench", "xmodal.serve", "xmodal.xadapter", "xmodal.demo", "xmodal.cli_util")),
    ("cli", ("xmodal.cli", "xmodal.cli_errors", "xmodal.classifier_cli", "xmodal.__main__", ROOT)),
)


def layer_of(module: str) -> tuple[int, str] | None:
    """(index, name) of the layer holding ``module`` (a dotted name inside the package), or None when no
    entry covers it. The package root matches only itself, every other entry its whole subtree."""
    for index, (name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != ROOT and module.startswith(prefix + ".")):
                return index, name
    return None
