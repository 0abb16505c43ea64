"""The architecture interface the stages read (``convert.Prepared.arch``); ``base.TextArch`` implements it.

Exactly what is read, and by whom:

- ``convert.prepare``: :meth:`Arch.tensors` (the GGUF tensors, each reading its own rows) and
  :meth:`Arch.model_info` (what the plan's rules need);
- ``convert`` (header) and tools writing a header: :attr:`Arch.name` (``general.architecture``),
  :meth:`Arch.write_hparams` (before ``general.file_type``), :meth:`Arch.write_arch_extras` (after it);
- ``calib``: :attr:`Arch.name` (the temporary GGUF it calibrates on);
- ``importance``: :attr:`Arch.record` (``record.forward.act``: the MLP activation).

A new architecture is a new :class:`~ggufq.arch.ArchRecord` read by ``TextArch``, not a new class
(docs/DESIGN.md, "How to add an architecture"); a class of its own must provide all of this.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import gguf

    from ..plan import ModelInfo
    from ..source import Model
    from . import ArchRecord, OutTensor


@runtime_checkable
class Arch(Protocol):
    record: "ArchRecord"

    @property
    def name(self) -> str: ...

    def tensors(self, model: "Model") -> "list[OutTensor]": ...

    def model_info(self) -> "ModelInfo": ...

    def write_hparams(self, w: "gguf.GGUFWriter") -> None: ...

    def write_arch_extras(self, w: "gguf.GGUFWriter") -> None: ...
