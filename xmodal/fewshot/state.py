"""Fitted few-shot methods as (tensors, JSON): the save/load contract behind every saved classifier.

A method's state is two things that need no pickle to store: a flat ``dict[str, Tensor]`` (written as
safetensors) and a JSON-able ``dict`` (constructor parameters, fitted scalars, ``selected_``, and how to
rebuild each fitted torch module). Encoding is generic, scikit-learn style:

* constructor parameters are the ``__init__`` arguments of every class in the method's MRO, read back
  from the attribute of the same name;
* fitted attributes are those whose name ends in ``_`` (``w_``, ``alpha_``, ``model_`` ...).

Values are encoded recursively: tensors become references into the tensor dict, tuples and non-finite
floats are tagged so they come back exactly, and a ``torch.nn.Module`` is stored as its ``state_dict`` plus
a config from a *module codec* (registered per module class with :func:`register_module_codec`) that can
rebuild an empty module of the right shape. A module without a codec is stored by structure (class,
parameters, buffers, children, plain attributes) and rebuilt without running ``__init__``, for classes
defined in xmodal or torch.nn only; anything else fails loudly at save time, never silently at load time.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from ..errors import InputError, UsageError

STATE_VERSION = 1
_SKIP_PARAMS = {"self", "device"}  # the device is chosen at load time, never restored


@dataclass(frozen=True)
class ModuleCodec:
    """How to describe a module class as JSON (``config``) and build an empty one from that config."""

    config: Callable[[nn.Module], dict]
    build: Callable[[dict], nn.Module]


_CODECS: dict[str, tuple[type, ModuleCodec]] = {}


def register_module_codec(cls: type, config: Callable[[nn.Module], dict], build: Callable[[dict], nn.Module]) -> None:
    """Make fitted modules of class ``cls`` storable: ``config(module)`` -> JSON dict, ``build(config)`` ->
    a module whose ``state_dict`` has the same keys and shapes (its values are then loaded strictly)."""
    _CODECS[cls.__qualname__] = (cls, ModuleCodec(config, build))


def _codec_for(module: nn.Module) -> tuple[str, ModuleCodec] | None:
    for klass in type(module).__mro__:
        entry = _CODECS.get(klass.__qualname__)
        if entry is not None and entry[0] is klass:
            return klass.__qualname__, entry[1]
    return None


# ------------------------------------------------------------------------------------------- encoding


class _Encoder:
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.tensors: dict[str, torch.Tensor] = {}

    def encode(self, value: Any, key: str) -> Any:
        if isinstance(value, nn.Module):
            found = _codec_for(value)
            if found is None:
                return self.encode_structure(value, key)
            name, codec = found
            for k, t in value.state_dict().items():
                self.tensors[f"{key}.{k}"] = _plain_tensor(t)
            return {"__module__": name, "config": self.encode(codec.config(value), f"{key}#config"), "key": key}
        if isinstance(value, torch.Tensor):
            self.tensors[key] = _plain_tensor(value)
            return {"__tensor__": key, "parameter": isinstance(value, nn.Parameter)}
        if isinstance(value, np.ndarray):
            self.tensors[key] = torch.from_numpy(np.ascontiguousarray(value)).clone()
            return {"__ndarray__": key}
        if isinstance(value, (np.generic,)):
            return self.encode(value.item(), key)
        if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"__float__": repr(value)}
        if isinstance(value, tuple):
            return {"__tuple__": [self.encode(v, f"{key}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, f"{key}.{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            bad = [k for k in value if not isinstance(k, str)]
            if bad:
                raise UsageError(f"{self.owner}: {key!r} is a dict with non-string keys {bad[:3]}; cannot store it as JSON",
                                 hint="use string keys for fitted dictionaries")
            if any(k.startswith("__") and k.endswith("__") for k in value):
                return {"__dict__": {k: self.encode(v, f"{key}.{k}") for k, v in value.items()}}
            return {k: self.encode(v, f"{key}.{k}") for k, v in value.items()}
        raise UsageError(f"{self.owner}: cannot store {key!r} of type {type(value).__name__}",
                         hint="keep fitted attributes to tensors, torch modules with a codec, numbers, strings, "
                              "lists, tuples and string-keyed dicts")


    def encode_structure(self, m: nn.Module, key: str) -> dict:
        """Any module of an xmodal or torch.nn class, by structure: its class, parameters, buffers, child
        modules and plain attributes (what ``__init__`` left in its ``__dict__``). Rebuilt without running
        ``__init__``, so no codec is needed; only classes under ``xmodal.`` / ``torch.nn.`` are accepted."""
        path = _class_path(type(m))
        if not path.startswith(_ALLOWED_MODULE_PREFIXES) or "<locals>" in path:
            raise UsageError(
                f"{self.owner} holds a fitted torch module {type(m).__name__} ({path}) at {key!r} that cannot be "
                "saved: only module classes defined in xmodal or torch.nn are rebuilt from a saved state",
                hint="register a codec with xmodal.fewshot.state.register_module_codec(cls, config, build) "
                     "or override get_state/set_state on the method")
        params, buffers = {}, {}
        for name, p in m._parameters.items():
            if p is not None:
                self.tensors[f"{key}.{name}"] = _plain_tensor(p)
            params[name] = None if p is None else {"requires_grad": bool(p.requires_grad)}
        for name, b in m._buffers.items():
            if b is not None:
                self.tensors[f"{key}.{name}"] = _plain_tensor(b)
            buffers[name] = None if b is None else {"persistent": name not in m._non_persistent_buffers_set}
        children = {name: None if sub is None else self.encode(sub, f"{key}.{name}") for name, sub in m._modules.items()}
        attrs = {k: self.encode(v, f"{key}#{k}") for k, v in vars(m).items() if k not in _MODULE_INTERNALS}
        return {"__nn__": path, "key": key, "training": bool(m.training), "parameters": params, "buffers": buffers,
                "modules": children, "attrs": attrs}


_ALLOWED_MODULE_PREFIXES = ("xmodal.", "torch.nn.")
_MODULE_INTERNALS = set(nn.Module().__dict__)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve_module_class(path: str, owner: str) -> type:
    """The nn.Module class named ``module:qualname``, imported only from xmodal or torch.nn."""
    import importlib

    modname, _, qualname = path.partition(":")
    bad = InputError(f"{owner}: the saved state names a module class {path!r} that cannot be rebuilt",
                     hint="load it with the xmodal version that saved it")
    if not path.startswith(_ALLOWED_MODULE_PREFIXES) or not qualname or "<locals>" in qualname:
        raise bad
    try:
        obj: Any = importlib.import_module(modname)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise bad from None
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise bad
    return obj


def _decode_structure(value: dict, tensors: dict[str, torch.Tensor], device: str, owner: str) -> nn.Module:
    cls = _resolve_module_class(value["__nn__"], owner)
    key = value["key"]
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    for k, v in value["attrs"].items():
        m.__dict__[k] = _decode(v, tensors, device, owner)
    for name, spec in value["parameters"].items():
        m._parameters[name] = None if spec is None else nn.Parameter(
            _tensor(tensors, f"{key}.{name}", owner).to(device), requires_grad=spec["requires_grad"])
    for name, spec in value["buffers"].items():
        m._buffers[name] = None if spec is None else _tensor(tensors, f"{key}.{name}", owner).to(device)
        if spec is not None and not spec["persistent"]:
            m._non_persistent_buffers_set.add(name)
    for name, sub in value["modules"].items():
        m._modules[name] = None if sub is None else _decode(sub, tensors, device, owner)
    m.training = bool(value["training"])
    return m


def _plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU copy that owns its memory (safetensors refuses shared storage)."""
    return t.detach().to("cpu").contiguous().clone()


def _decode(value: Any, tensors: dict[str, torch.Tensor], device: str, owner: str) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, device, owner) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        t = _tensor(tensors, value["__tensor__"], owner).to(device)
        return nn.Parameter(t) if value.get("parameter") else t
    if "__ndarray__" in value:
        return _tensor(tensors, value["__ndarray__"], owner).numpy()
    if "__float__" in value:
        return float(value["__float__"])
    if "__tuple__" in value:
        return tuple(_decode(v, tensors, device, owner) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: _decode(v, tensors, device, owner) for k, v in value["__dict__"].items()}
    if "__module__" in value:
        return _decode_module(value, tensors, device, owner)
    if "__nn__" in value:
        return _decode_structure(value, tensors, device, owner)
    return {k: _decode(v, tensors, device, owner) for k, v in value.items()}


def _tensor(tensors: dict[str, torch.Tensor], key: str, owner: str) -> torch.Tensor:
    if key not in tensors:
        raise InputError(f"{owner}: the saved state lacks tensor {key!r}",
                         hint="the adapter file is incomplete or from another model; save the classifier again")
    return tensors[key]


def _decode_module(value: dict, tensors: dict[str, torch.Tensor], device: str, owner: str) -> nn.Module:
    name, key = value["__module__"], value["key"]
    if name not in _CODECS:
        raise InputError(f"{owner}: the saved state holds a {name} module this xmodal cannot rebuild",
                         hint="load it with the xmodal version that saved it")
    config = _decode(value["config"], tensors, "cpu", owner)
    module = _CODECS[name][1].build(config)
    prefix = key + "."
    state = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(f"{owner}: saved weights of {key!r} do not fit a {name}: {exc}",
                         hint="the adapter file does not match its JSON; save the classifier again") from None
    return module.to(device).eval()


# ------------------------------------------------------------------------------------------- contract


def constructor_params(method: Any) -> dict[str, Any]:
    """``__init__`` arguments of every class in the MRO that the method keeps as same-named attributes."""
    names: list[str] = []
    for klass in type(method).__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in _SKIP_PARAMS or p.name in names:
                continue
            names.append(p.name)
    return {n: getattr(method, n) for n in names if hasattr(method, n)}


def fitted_attributes(method: Any) -> dict[str, Any]:
    """Public attributes whose name ends in ``_`` (scikit-learn's convention for what ``fit`` learned)."""
    return {k: v for k, v in vars(method).items() if k.endswith("_") and not k.startswith("_")}


def get_state(method: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a fitted method; ``meta`` is plain JSON (no NaN/inf floats)."""
    owner = f"few-shot method {getattr(method, 'name', '') or type(method).__name__!r}"
    fitted = fitted_attributes(method)
    if not [k for k in fitted if k != "selected_"]:
        raise UsageError(f"{owner} is not fitted, so there is nothing to save",
                         hint="call fit(support, val, text_classifier) (or FewShotClassifier.fit) first")
    enc = _Encoder(owner)
    params = {k: enc.encode(v, f"param.{k}") for k, v in constructor_params(method).items()}
    fitted_enc = {k: enc.encode(v, f"fitted.{k}") for k, v in fitted.items()}
    meta = {"state_version": STATE_VERSION, "method": getattr(method, "name", ""),
            "class": f"{type(method).__module__}.{type(method).__qualname__}",
            "params": params, "fitted": fitted_enc}
    return enc.tensors, meta


def set_state(method: Any, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore fitted attributes from ``get_state``'s output onto a constructed (unfitted) method."""
    owner = f"few-shot method {getattr(method, 'name', '') or type(method).__name__!r}"
    _check_meta(meta, owner)
    device = str(getattr(method, "device", "cpu"))
    for k, v in meta["fitted"].items():
        setattr(method, k, _decode(v, tensors, device, owner))


def decode_params(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Constructor parameters from ``meta`` (tensor-valued ones from ``tensors``)."""
    _check_meta(meta, f"few-shot method {meta.get('method')!r}")
    return {k: _decode(v, tensors, "cpu", meta.get("method", "?")) for k, v in meta["params"].items()}


def _check_meta(meta: Any, owner: str) -> None:
    if not isinstance(meta, dict) or not isinstance(meta.get("fitted"), dict) or not isinstance(meta.get("params"), dict):
        raise InputError(f"{owner}: the saved method state is malformed (no 'params'/'fitted' sections)",
                         hint="the JSON was edited or truncated; save the classifier again")
    version = meta.get("state_version")
    if version != STATE_VERSION:
        raise InputError(f"{owner}: saved method state version {version!r} is not supported (this xmodal reads "
                         f"version {STATE_VERSION})", hint="load it with the xmodal version that saved it")


# ------------------------------------------------------------------------------------------- codecs


def _register_cache_codecs() -> None:
    """Codecs for the cache model of Tip-Adapter(-F) and XMAdapter (``_cache.py``)."""
    from ._cache import CacheModel, Gamma, TextBranch

    def arch_of(net: nn.Module) -> tuple[str, int]:
        if isinstance(net, nn.Identity):
            return "identity", -1
        if isinstance(net, nn.Linear):
            return "linear", net.out_features
        if isinstance(net, nn.Sequential) and isinstance(net[-1], nn.Linear):
            return "mlp", net[-1].out_features
        raise UsageError(f"cannot describe network {type(net).__name__} of a TextBranch",
                         hint="extend xmodal/fewshot/state.py with the new architecture")

    def text_config(m: TextBranch) -> dict:
        arch, out_dim = arch_of(m.meta_net)
        img_arch, img_out = arch_of(m.img2txt)
        img_in = m.img2txt.in_features if isinstance(m.img2txt, nn.Linear) else (
            m.img2txt[0].in_features if isinstance(m.img2txt, nn.Sequential) else m.class_text.shape[1])
        return {"classes": int(m.class_text.shape[0]), "text_dim": int(m.class_text.shape[1]), "img_dim": int(img_in),
                "out_dim": int(out_dim if out_dim > 0 else img_in), "arch": arch}

    def text_build(c: dict) -> TextBranch:
        return TextBranch(torch.zeros(c["classes"], c["text_dim"]), torch.zeros(c["classes"]), c["img_dim"],
                          c["out_dim"], c["arch"], tie_init=False)

    def gamma_config(m: Gamma) -> dict:
        img_dim = m.net[0].in_features if m.mode == "per-sample" else 1
        return {"mode": m.mode, "value": float(m.value), "img_dim": int(img_dim)}

    def gamma_build(c: dict) -> Gamma:
        g = Gamma(c["mode"], c["value"], c["img_dim"])
        g.value = float(c["value"])
        return g

    def cache_config(m: CacheModel) -> dict:
        return {"entries": int(m.keys.shape[0]), "dim": int(m.keys.shape[1]), "classes": int(m.values.shape[1]),
                "text_classifier_dim": int(m.text_classifier.shape[1]), "logit_scale": float(m.logit_scale),
                "train_keys": isinstance(m.keys, nn.Parameter),
                "text": None if m.text is None else text_config(m.text),
                "gamma": None if m.gamma is None else gamma_config(m.gamma)}

    def cache_build(c: dict) -> CacheModel:
        labels = torch.arange(c["entries"]) % c["classes"]
        return CacheModel(torch.zeros(c["entries"], c["dim"]), labels,
                          torch.zeros(c["classes"], c["text_classifier_dim"]), c["logit_scale"], c["train_keys"],
                          text=None if c["text"] is None else text_build(c["text"]),
                          gamma=None if c["gamma"] is None else gamma_build(c["gamma"]))

    register_module_codec(CacheModel, cache_config, cache_build)
    register_module_codec(TextBranch, text_config, text_build)
    register_module_codec(Gamma, gamma_config, gamma_build)


_register_cache_codecs()
