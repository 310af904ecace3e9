"""Every public name of probloss, found from the packages' ``__all__`` (none listed by hand).

``PUBLIC_CALLABLES`` maps ``"package.name"`` (and ``"nn.Class.forward"`` for modules) to the
object; classes are represented by their constructor signature.
"""

from __future__ import annotations

import inspect

import torch

import probloss

PACKAGES = ("special", "functional", "metrics", "distributions", "nn", "vae")


def _public() -> dict[str, object]:
    names: dict[str, object] = {}
    for package in PACKAGES:
        module = getattr(probloss, package)
        for name in module.__all__:
            obj = getattr(module, name)
            if not callable(obj):
                continue
            if inspect.isclass(obj) and issubclass(obj, tuple):
                continue  # a result type (NamedTuple): no parameters to rule on
            names[f"{package}.{name}"] = obj
            if inspect.isclass(obj) and issubclass(obj, torch.nn.Module):
                names[f"{package}.{name}.forward"] = obj.forward
    return names


PUBLIC_CALLABLES = _public()


def public_signature(name: str) -> inspect.Signature:
    """The signature a user calls: a class's ``__init__`` without ``self``."""
    obj = PUBLIC_CALLABLES[name]
    if inspect.isclass(obj):
        return inspect.signature(obj)
    sig = inspect.signature(obj)
    params = [p for p in sig.parameters.values() if p.name != "self"]
    return sig.replace(parameters=params)
