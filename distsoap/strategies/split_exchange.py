"""How the pieces of split parameters travel under the lossless sharded strategies.

A parameter whose blocks have several owners (:func:`~distsoap.placement.place_blocks`) needs
more than the one exchange each way of a parameter placed whole
(:class:`~distsoap.strategies.sharded.ShardedLossless`). Two ways, mixed into that class:

- **direct** (:meth:`SplitExchange._direct_grads`, :meth:`SplitExchange._direct_updates`):
  where the blocks are boxes of the parameter (:mod:`~distsoap.strategies.direct_rows`), each
  rank sends every owner the parts of its shard inside that owner's blocks, and each owner sends
  every rank the parts of its update inside that rank's shard; one ``all_to_all_single`` each
  way, each element once (counted as ``grad_sync`` and ``update_scatter``);
- **the assembler's round trip** (:meth:`SplitExchange._send_rows`,
  :meth:`SplitExchange._gather_rows`): elsewhere, one owner assembles the whole gradient as for
  a parameter placed whole, sends the other owners their rows and gathers their update rows back
  before scattering the whole update (``grad_rows`` and ``update_rows``).

Every rank makes the same calls in the same order; each (parameter, sender, receiver) entry
carries one flag, so presence of a gradient and a stop request reach every rank that needs them.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from distsoap.comm import pack_flagged, read_flag, unpack_flagged, update_flag
from distsoap.placement import Piece
from distsoap.strategies.base import groups_by_param
from distsoap.strategies.direct_rows import (
    BoxPart,
    Slab,
    box_parts,
    gather_block_parts,
    gather_parts,
    scatter_block_parts,
    scatter_parts,
    slabs_of,
)
from distsoap.strategies.split_params import has_update, join_pieces


class SplitExchange:
    """The exchanges of split parameters (a mixin of ``ShardedLossless``).

    Reads the strategy's ``params``, ``layouts``, ``specs``, ``split`` (pieces by owner),
    ``direct`` (split parameters exchanged directly), ``owners`` (assemblers), ``_held``,
    ``rank``, ``world``, ``exact``, ``comm_dtype`` and ``engine``, and calls its ``_exchange``,
    ``_local_grad`` and ``_grad_dtype``.
    """

    def _init_split_exchange(self) -> None:
        """Set up the caches, once ``split`` and ``direct`` are known."""
        self._parts: dict[tuple[int, int, int], list[BoxPart]] = {}
        """(parameter, owner, holder) -> the parts of the owner's blocks in the holder's shard."""
        self._slab_cache: dict[tuple[int, int], list[Slab]] = {}
        """(parameter, holder) -> the holder's shard as slabs."""
        self._numels: dict[tuple[int, int, int], int] = {}
        """(parameter, owner, holder) -> the elements of those parts."""
        self._piece_of = {(i, piece.owner): piece for i in self.direct for piece in self.split[i]}
        """(direct parameter, owner) -> that owner's piece of it."""

    def _slabs(self, index: int, holder: int) -> list[Slab]:
        """``holder``'s piece of parameter ``index`` as boxes of the parameter (cached)."""
        key = (index, holder)
        slabs = self._slab_cache.get(key)
        if slabs is None:
            slabs = slabs_of(self.layouts[index], holder)
            self._slab_cache[key] = slabs
        return slabs

    def _box_parts(self, index: int, piece: Piece, holder: int) -> list[BoxPart]:
        """The parts of ``piece``'s blocks in ``holder``'s shard (cached)."""
        key = (index, piece.owner, holder)
        parts = self._parts.get(key)
        if parts is None:
            parts = box_parts(self.specs[index], piece.rows, self._slabs(index, holder))
            self._parts[key] = parts
        return parts

    def _parts_numel(self, index: int, piece: Piece, holder: int) -> int:
        """The elements of :meth:`_box_parts` (cached)."""
        key = (index, piece.owner, holder)
        numel = self._numels.get(key)
        if numel is None:
            numel = sum(p.numel for p in self._box_parts(index, piece, holder))
            self._numels[key] = numel
        return numel

    def _direct_grads(self, direct: list[int], grads: dict[int, torch.Tensor], device) -> None:
        """Shard holders send each owner of a piece the parts of their gradient in its blocks.

        One ``all_to_all_single`` for all ``direct`` parameters; each (parameter, holder, owner)
        carries a flag (gradient present) and the parts, so every owner of a parameter learns
        the same presence. ``grads`` gains the row-form gradients of the pieces held here
        (absent shards read as zeros, as the assembler would assemble them).
        """
        to: list[list[tuple[float, torch.Tensor | None, int]]] = [[] for _ in range(self.world)]
        recv_splits: list[list[int]] = [[] for _ in range(self.world)]
        recv_items: list[list[int]] = [[] for _ in range(self.world)]
        for i in direct:
            layout, local = self.layouts[i], self._local_grad(i)
            for piece in self.split[i]:
                if self.rank in layout.sources(piece.owner):
                    parts = self._box_parts(i, piece, self.rank)
                    values = None
                    if local is not None:
                        values = gather_parts(local, self._slabs(i, self.rank), parts)
                    numel = self._parts_numel(i, piece, self.rank)
                    to[piece.owner].append((float(local is not None), values, numel))
                if piece.owner == self.rank:
                    for source in layout.sources(self.rank):
                        numel = self._parts_numel(i, piece, source)
                        recv_splits[source] += [1, numel]
                        recv_items[source].append(i)
        send = pack_flagged([b for blocks in to for b in blocks], self.exact, device)
        send_sizes = [sum(1 + n for _, _, n in blocks) for blocks in to]
        recv_sizes = [sum(sizes) for sizes in recv_splits]
        received = self._exchange(send, send_sizes, recv_sizes, "grad_sync")
        flags_from, values_from = unpack_flagged(received, recv_splits)
        rows: dict[int, torch.Tensor] = {}
        present: dict[int, bool] = {}
        for source, indices in enumerate(recv_items):
            for i, flag, values in zip(indices, flags_from[source], values_from[source]):
                mine = self._piece_of[i, self.rank]
                if i not in rows:
                    shape = (len(mine.rows), *self.specs[i].block_shape)
                    rows[i] = torch.zeros(shape, dtype=self._grad_dtype(i), device=device)
                present[i] = present.get(i, False) or flag != 0
                scatter_block_parts(rows[i], values, self._box_parts(i, mine, source))
        for i, gradient in rows.items():
            if present[i]:
                grads[id(self.params[i])] = gradient

    def _direct_updates(
        self, direct: list[int], updates, error: str | None, device
    ) -> list[tuple[int, int, float, torch.Tensor]]:
        """Owners of pieces send every rank the parts of their update in its shard.

        One ``all_to_all_single``; each (parameter, owner, rank) carries a flag (update computed,
        training must stop) and the parts, so every rank hears every owner. ``updates`` loses
        the pieces' row-form deltas.

        Returns:
            Per direct parameter this rank holds a shard of, ``(index, owner, flag, flat shard
            delta)`` for :meth:`apply_flagged` (the owners' flags combined: an update when every
            owner computed one; the stop flags of all owners carried by one entry each).
        """
        wire = self.comm_dtype or self.exact
        to: list[list[tuple[float, torch.Tensor | None, int]]] = [[] for _ in range(self.world)]
        recv_splits: list[list[int]] = [[] for _ in range(self.world)]
        recv_items: list[list[int]] = [[] for _ in range(self.world)]
        for i in direct:
            for piece in self.split[i]:
                if piece.owner == self.rank:
                    delta = updates.pop(id(self.params[i]), (None, None))[1]
                    shape = (len(piece.rows), *self.specs[i].block_shape)
                    blocks = None if delta is None else delta.reshape(shape)
                    flag = update_flag(delta is not None, error is not None)
                    for destination in range(self.world):
                        parts = self._box_parts(i, piece, destination)
                        values = None if blocks is None else gather_block_parts(blocks, parts)
                        numel = self._parts_numel(i, piece, destination)
                        to[destination].append((flag, values, numel))
                numel = self._parts_numel(i, piece, self.rank)
                recv_splits[piece.owner] += [1, numel]
                recv_items[piece.owner].append(i)
        send = pack_flagged([b for blocks in to for b in blocks], wire, device)
        send_sizes = [sum(1 + n for _, _, n in blocks) for blocks in to]
        recv_sizes = [sum(sizes) for sizes in recv_splits]
        received = self._exchange(send, send_sizes, recv_sizes, "update_scatter")
        flags_from, values_from = unpack_flagged(received, recv_splits)
        shards: dict[int, torch.Tensor] = {}
        has: dict[int, list[bool]] = {}
        result: list[tuple[int, int, float, torch.Tensor]] = []
        for owner, indices in enumerate(recv_items):
            for i, flag, values in zip(indices, flags_from[owner], values_from[owner]):
                computed, stop = read_flag(flag)
                has.setdefault(i, []).append(computed)
                if stop:  # carried on its own, with no update
                    result.append((i, owner, update_flag(False, True), values[:0]))
                if i not in shards:
                    numel = self.layouts[i].numel(self.rank)
                    shards[i] = torch.zeros(numel, dtype=wire, device=device)
                parts = self._box_parts(i, self._piece_of[i, owner], self.rank)
                scatter_parts(shards[i], self._slabs(i, self.rank), values, parts)
        for i, flags in has.items():
            if has_update(self.engine, self.params[i], flags):
                result.append((i, -1, update_flag(True, False), shards[i]))
        return result

    def _piece_numel(self, index: int, piece: Piece) -> int:
        """Elements of a piece's rows (the padding of blocks included)."""
        return len(piece.rows) * math.prod(self.specs[index].block_shape)

    def _send_rows(self, split: list[int], grads: dict[int, torch.Tensor], device) -> None:
        """Assemblers send each owner of a piece of their split parameters its gradient rows.

        ``grads`` loses the whole gradients of the split parameters this rank assembled and
        gains the rows of the pieces it holds (one ``all_to_all_single``, flags for absent
        gradients; the same call on every rank).
        """
        send_blocks: list[tuple[float, torch.Tensor | None, int]] = []
        send_sizes = [0] * self.world
        recv_splits: list[list[int]] = [[] for _ in range(self.world)]
        recv_items: list[list[int]] = [[] for _ in range(self.world)]
        rows_of: dict[int, torch.Tensor | None] = {}
        for i in split:
            if self.owners[i] == self.rank:
                whole = grads.pop(id(self.params[i]), None)
                rows_of[i] = None if whole is None else self.specs[i].to_rows(whole)
        to: list[list[tuple[int, Piece]]] = [[] for _ in range(self.world)]
        for i in rows_of:  # in split order: each destination reads its pieces in that order
            for piece in self.split[i]:
                to[piece.owner].append((i, piece))
        for destination, pieces in enumerate(to):
            for i, piece in pieces:
                rows, numel = rows_of[i], self._piece_numel(i, piece)
                part = None if rows is None else rows[list(piece.rows)]
                send_blocks.append((float(rows is not None), part, numel))
                send_sizes[destination] += 1 + numel
        for i in split:
            mine = self._held.get(id(self.params[i]))
            if mine is not None:
                source = self.owners[i]
                recv_splits[source] += [1, len(mine) * math.prod(self.specs[i].block_shape)]
                recv_items[source].append(i)
        send = pack_flagged(send_blocks, self.exact, device)
        recv_sizes = [sum(sizes) for sizes in recv_splits]
        received = self._exchange(send, send_sizes, recv_sizes, "grad_rows")
        flags_from, rows_from = unpack_flagged(received, recv_splits)
        for source, indices in enumerate(recv_items):
            for i, flag, rows in zip(indices, flags_from[source], rows_from[source]):
                if flag != 0:
                    shape = (len(self._held[id(self.params[i])]), *self.specs[i].block_shape)
                    grads[id(self.params[i])] = rows.view(shape).to(self._grad_dtype(i))

    def _gather_rows(self, split: list[int], updates, error: str | None, device) -> bool:
        """Owners of pieces send their update rows to the assembler, which joins them.

        ``updates`` loses the pieces' row-form deltas and gains, on the assembler, each split
        parameter's whole delta. Returns whether some piece's owner flagged that training must
        stop (the assembler then flags it to every rank with the update).
        """
        send_blocks: list[tuple[float, torch.Tensor | None, int]] = []
        send_sizes = [0] * self.world
        recv_splits: list[list[int]] = [[] for _ in range(self.world)]
        recv_items: list[list[tuple[int, Piece]]] = [[] for _ in range(self.world)]
        deltas: dict[int, tuple[dict[str, Any] | None, torch.Tensor | None]] = {}
        for i in split:
            if id(self.params[i]) in self._held:
                deltas[i] = updates.pop(id(self.params[i]), (None, None))
        to: list[list[int]] = [[] for _ in range(self.world)]
        for i in deltas:  # in split order: each assembler reads its pieces in that order
            to[self.owners[i]].append(i)
        for destination, indices in enumerate(to):
            for i in indices:
                numel = len(self._held[id(self.params[i])]) * math.prod(self.specs[i].block_shape)
                delta = deltas[i][1]
                send_blocks.append(
                    (update_flag(delta is not None, error is not None), delta, numel)
                )
                send_sizes[destination] += 1 + numel
        for i in split:
            if self.owners[i] == self.rank:
                for piece in self.split[i]:
                    recv_splits[piece.owner] += [1, self._piece_numel(i, piece)]
                    recv_items[piece.owner].append((i, piece))
        send = pack_flagged(send_blocks, self.comm_dtype or self.exact, device)
        recv_sizes = [sum(sizes) for sizes in recv_splits]
        received = self._exchange(send, send_sizes, recv_sizes, "update_rows")
        flags_from, rows_from = unpack_flagged(received, recv_splits)
        joined: dict[int, list[tuple[bool, tuple[int, ...], torch.Tensor]]] = {}
        abort = False
        for source, entries in enumerate(recv_items):
            for (i, piece), flag, rows in zip(entries, flags_from[source], rows_from[source]):
                computed, stop = read_flag(flag)
                abort = abort or stop
                joined.setdefault(i, []).append((computed, piece.rows, rows))
        groups = groups_by_param(self.engine.param_groups)
        for i, parts in joined.items():
            param = self.params[i]
            if not has_update(self.engine, param, [h for h, _, _ in parts]):
                updates[id(param)] = (groups[id(param)], None)
                continue
            delta = join_pieces(self.specs[i], [(rows, d) for _, rows, d in parts])
            updates[id(param)] = (groups[id(param)], delta)
        return abort
