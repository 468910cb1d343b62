"""``torch.distributed.checkpoint`` (DCP) support: the loader is ``Stateful``.

``dcp.save({"loader": loader, ...}, checkpoint_id=path)`` and ``dcp.load(...)`` call the
loader's ``state_dict()`` / ``load_state_dict()``. DCP loads tensors in place into the
tensors of a template (the ``state_dict()`` of the loader being loaded), so every tensor
must keep its shape; the loader's state does not (the active set shrinks, the summary log
grows, the value bank is allocated at the first observation). So when DCP is the caller,
``state_dict()`` hands over one opaque entry instead, which DCP stores and restores as
bytes::

    {"format": "kcd_fast.KCDLoader/1+dcp", "state": <torch.save bytes of the usual state>}

and ``load_state_dict`` accepts it as well as the usual state. The caller is recognised
by the module of the function that called ``state_dict()`` (DCP's saver or loader; a
kcd_fast object that delegates, such as ``KCDBatchSampler``, is looked through); for
DCP's template at load time the loader returns the entry without computing a state (no
collective). Under DDP ``dcp.save`` is a collective, as the loader's ``state_dict()`` is:
call it on every rank; the state is global, so the ranks' entries are identical and DCP
writes one.
"""

from __future__ import annotations

import io
import types
from typing import Any

import torch

__all__ = ["DCP_FORMAT", "caller", "pack", "placeholder", "unpack"]

DCP_FORMAT = "kcd_fast.KCDLoader/1+dcp"
_SAVER = "torch.distributed.checkpoint.state_dict_saver"
_LOADER = "torch.distributed.checkpoint.state_dict_loader"


def caller(frame: types.FrameType | None) -> str | None:
    """Returns "save" or "load" when ``frame`` (the frame that called ``state_dict()``), or
    the first frame above it outside kcd_fast (``KCDBatchSampler.state_dict`` delegates), is
    DCP's saver or loader, else None."""
    while frame is not None and frame.f_globals.get("__name__", "").startswith("kcd_fast."):
        frame = frame.f_back
    name = frame.f_globals.get("__name__", "") if frame is not None else ""
    return "save" if name == _SAVER else "load" if name == _LOADER else None


def pack(state: dict[str, Any]) -> dict[str, Any]:
    """The DCP entry for the usual ``state``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return {"format": DCP_FORMAT, "state": buf.getvalue()}


def placeholder() -> dict[str, Any]:
    """DCP's template at load time: the same keys; DCP replaces both values."""
    return {"format": DCP_FORMAT, "state": b""}


def unpack(state: Any) -> Any:
    """The usual state inside a DCP entry; anything else is returned as it is."""
    if not (isinstance(state, dict) and state.get("format") == DCP_FORMAT):
        return state
    data = state.get("state")
    if not isinstance(data, bytes) or not data:
        raise ValueError(
            f"a {DCP_FORMAT!r} state must hold the saved state's bytes under 'state', got "
            f"{type(data).__name__} of {len(data) if isinstance(data, bytes) else '?'} bytes (was the checkpoint "
            "written by dcp.save({'loader': loader})?)"
        )
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as err:  # any unpickling failure means a bad entry
        raise ValueError(f"the {DCP_FORMAT!r} state could not be read by torch.load: {err}") from err
