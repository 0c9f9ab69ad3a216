"""`cdm inspect MAP --seq I`: a readable side-by-side view of one sequence's alignment and candidate mapping."""

from __future__ import annotations

from typing import Any

import numpy as np

from cdm.mapping.store import KIND_NAMES, MapStore
from cdm.storage.ragged import StoreError
from cdm.storage.teacher import TeacherStore


def _show(s: str, width: int) -> str:
    s = s.replace("\n", "\\n").replace("\t", "\\t")
    return (s[: width - 1] + "…") if len(s) > width else s


def inspect_sequence(map_url: str, seq: int, *, store_url: str | None = None, top: int = 3, max_rows: int = 80, only_response: bool = True) -> str:
    """Render sequence `seq`: student tokens, their text, the paired teacher token and the top teacher candidates."""
    import tokenizers

    from cdm.mapping.tokenizers import load_tokenizer

    if top < 0:
        raise ValueError(f"--top must be >= 0, got {top}")
    if max_rows < 1:
        raise ValueError(f"--max-rows must be >= 1, got {max_rows}")
    mstore = MapStore(map_url)
    if not 0 <= seq < len(mstore):
        raise IndexError(f"--seq {seq}: the map store has {len(mstore)} sequences (0..{len(mstore) - 1})")
    recorded = mstore.manifest["teacher_store"]["url"]
    try:
        tstore = TeacherStore(store_url or recorded)
    except StoreError as e:
        if store_url:
            raise
        raise StoreError(f"the teacher store this map was built from ({recorded}) cannot be opened ({e}); if it "
                         "moved, pass its new location with --store") from e
    mstore.check_pair(tstore.manifest)
    m = mstore[seq]
    t = tstore[m.teacher_index]
    tj = tstore.tokenizer_json()
    t_tok = tokenizers.Tokenizer.from_str(tj) if tj else None
    s_tok = load_tokenizer(mstore.manifest["student"]["tokenizer"])
    maps = mstore.vocab

    def t_piece(i: int) -> str:
        return t_tok.id_to_token(int(i)) if t_tok is not None else str(int(i))

    def s_piece(i: int) -> str:
        return s_tok.id_to_token(int(i)) or str(int(i))

    kind_width = max(len(k) for k in KIND_NAMES.values())
    lines = [
        f"sequence {seq}  seq_id {m.seq_id}  teacher index {m.teacher_index}",
        f"teacher tokens {t.n_tokens}, student tokens {len(m.student_ids)}, aligned {(m.teacher_row >= 0).sum()}, "
        f"response chars {np.asarray(t.response_spans).reshape(-1, 2).tolist()}",
        "",
        f"{'j':>4} {'student token':<16} {'text':<14} {'kind':<{kind_width}} {'t-row':>5} {'teacher token':<16} "
        "top teacher candidates (p -> student: =exact ~fuzzy x none)",
    ]
    shown = 0
    for j in range(len(m.student_ids)):
        if only_response and not m.loss_mask[j] and m.teacher_row[j] < 0:
            continue
        a, b = m.student_spans[j]
        r = int(m.teacher_row[j])
        cells = [f"{j:>4}", f"{_show(s_piece(m.student_ids[j]), 16):<16}", f"{_show(t.text[a:b], 14):<14}", f"{KIND_NAMES[int(m.align_kind[j])]:<{kind_width}}"]
        if r >= 0:
            cells += [f"{r:>5}", f"{_show(t_piece(t.token_ids[r]), 16):<16}"]
            cands = []
            for c in range(min(top, t.topk_ids.shape[1])):
                tid = int(t.topk_ids[r, c])
                p = float(np.exp(t.topk_logprobs[r, c]))
                em = int(maps.em_t2s[tid])
                if em >= 0:
                    dest = f"={_show(s_piece(em), 10)}"
                else:
                    idx, _ = maps.fuzzy_t2s.row(tid)
                    dest = f"~{_show(s_piece(idx[0]), 10)}" if len(idx) else "x"
                cands.append(f"{_show(t_piece(tid), 10)} {p:.2f}->{dest}")
            cells.append("  ".join(cands))
        else:
            cells += [f"{'-':>5}", f"{'':<16}"]
        lines.append(" ".join(cells))
        shown += 1
        if shown >= max_rows:
            lines.append(f"… ({len(m.student_ids) - j - 1} more positions; use --max-rows)")
            break
    return "\n".join(lines)


def describe(map_url: str) -> dict[str, Any]:
    return MapStore(map_url).manifest
