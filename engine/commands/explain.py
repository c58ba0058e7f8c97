"""`ftl explain MODEL --text "..."`: which input tokens a prediction rests on.

cls: per-token attributions for the predicted class (or `--target LABEL`). lm: the top-k next-token
probabilities at every position, plus attributions of the most likely next token after the text (or
`--target TOKEN`). Optionally the attention map of one layer/head (or the mean of a layer's heads).

Attribution methods, for f = the target's logit as a function of the token embeddings x [T, d]
(position embeddings are added inside the model and left alone):
- integrated gradients (`ig`, the default): a_t = sum_d (x - x')_td * mean over alpha of
  df/dx (x' + alpha (x - x'))_td, the mean taken by Gauss-Legendre quadrature with `steps` nodes on
  [0, 1]. Completeness: sum_t a_t = f(x) - f(x'), up to the quadrature error, which is reported (and
  tested). The baseline x' is the pad token's embedding at every position (`pad`) or zeros (`zero`).
- gradient x input (`grad_input`): a_t = sum_d x_td * df/dx_td, one backward pass, no completeness.

Writes DIR/explain.html (self-contained: tokens shaded by attribution, red for the target and blue
against it, the prediction, the top-k table, the PNGs inlined), DIR/attributions.png,
DIR/attention.png (with --attention) and DIR/explain.json, and prints a summary.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.errors import UsageError


@dataclass
class Explanation:
    head: str
    tokens: list[str]
    target: str
    target_index: int
    target_prob: float
    method: str
    attributions: list[float]
    completeness: dict = field(default_factory=dict)  # ig: f(x), f(baseline), sum, error
    top_next: list[list[tuple[str, float]]] = field(default_factory=list)  # lm: per position
    probs: dict = field(default_factory=dict)  # cls: label -> probability
    attention: list[list[float]] | None = None
    attention_title: str = ""


# -------------------------------------------------------------------------------------- attribution

def target_fn(hf, head: str, index: int):
    """embeddings [B, T, d] -> the target's logit [B], read at the last position (no padding here)."""
    def f(embeds: torch.Tensor) -> torch.Tensor:
        hidden = hf.transformer(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, -1]
        logits = hf.score(hidden) if head == "cls" else hf.lm_head(hidden)
        return logits[:, index]

    return f


def integrated_gradients(f, x: torch.Tensor, baseline: torch.Tensor, steps: int = 64,
                         batch: int = 16) -> tuple[torch.Tensor, dict]:
    """Per-token IG attributions of f at x [T, d] against `baseline`, and the completeness check."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas = torch.tensor((nodes + 1) / 2, dtype=x.dtype, device=x.device)  # Gauss-Legendre on [0, 1]
    w = torch.tensor(weights / 2, dtype=x.dtype, device=x.device)
    delta = x - baseline
    total = torch.zeros_like(x)
    for i in range(0, steps, batch):
        a = alphas[i:i + batch].view(-1, 1, 1)
        points = (baseline.unsqueeze(0) + a * delta.unsqueeze(0)).detach().requires_grad_(True)
        (grads,) = torch.autograd.grad(f(points).sum(), points)
        total += (grads * w[i:i + batch].view(-1, 1, 1)).sum(0)
    attr = (delta * total).sum(-1)
    with torch.no_grad():
        fx, fb = float(f(x.unsqueeze(0))[0]), float(f(baseline.unsqueeze(0))[0])
    s = float(attr.sum())
    return attr.detach(), {"f_input": fx, "f_baseline": fb, "sum_attributions": s, "difference": fx - fb,
                           "error": abs(s - (fx - fb)), "steps": steps}


def gradient_x_input(f, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(x.unsqueeze(0)).sum(), x)
    return (x * grad).sum(-1).detach()


# -------------------------------------------------------------------------------------------- model

def _token_strings(tok, ids: list[int]) -> list[str]:
    return [tok.decode([i]) for i in ids]


def explain(model_dir: Path, text: str, method: str = "ig", steps: int = 64, baseline: str = "pad",
            target: str | None = None, top_k: int = 5, attention: tuple[int, int | None] | None = None,
            max_tokens: int = 512) -> Explanation:
    from engine.commands import models as tools

    model_dir, _ = tools.resolve_model_dir(Path(model_dir))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hf, tok, head = tools.load_model(model_dir, device)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    problems = []
    if not ids:
        problems.append("--text is empty after tokenization")
    limit = min(max_tokens, int(hf.config.n_positions))
    if len(ids) > limit:
        problems.append(f"--text is {len(ids)} tokens; at most {limit} can be explained at once")
    if attention is not None:
        layer, h = attention
        if not 0 <= layer < hf.config.n_layer or (h is not None and not 0 <= h < hf.config.n_head):
            problems.append(f"--attention {layer}:{'mean' if h is None else h} is outside the model's "
                            f"{hf.config.n_layer} layers x {hf.config.n_head} heads (both count from 0)")
    labels = [hf.config.id2label[i] for i in range(hf.config.num_labels)] if head == "cls" else []
    target_index = None
    if target is not None:
        if head == "cls":
            if target in labels:
                target_index = labels.index(target)
            else:
                problems.append(f"--target {target!r} is not a label of this model ({', '.join(labels)})")
        else:
            t_ids = tok(target, add_special_tokens=False)["input_ids"]
            if len(t_ids) != 1:
                problems.append(f"--target {target!r} is {len(t_ids)} tokens for this tokenizer; give one token")
            else:
                target_index = t_ids[0]
    if problems:
        raise UsageError(problems)

    input_ids = torch.tensor([ids], device=device)
    with torch.no_grad():
        logits = hf(input_ids=input_ids).logits.float().cpu()
    if head == "cls":
        probs = logits[0].softmax(-1)
    else:
        all_probs = logits[0].softmax(-1)
        probs = all_probs[-1]
    if target_index is None:
        target_index = int(probs.argmax())
    tokens = _token_strings(tok, ids)

    embeds = hf.transformer.wte(input_ids)[0].detach()
    f = target_fn(hf, head, target_index)
    completeness: dict = {}
    if method == "ig":
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        base = (hf.transformer.wte.weight[pad].detach().expand_as(embeds).clone() if baseline == "pad"
                else torch.zeros_like(embeds))
        attr, completeness = integrated_gradients(f, embeds, base, steps)
        completeness["baseline"] = baseline
    else:
        attr = gradient_x_input(f, embeds)

    result = Explanation(head=head, tokens=tokens, method=method, target_index=target_index,
                         target=labels[target_index] if head == "cls" else tok.decode([target_index]),
                         target_prob=float(probs[target_index]), attributions=attr.cpu().tolist(),
                         completeness=completeness)
    if head == "cls":
        result.probs = {name: float(p) for name, p in zip(labels, probs.tolist())}
    else:
        k = min(top_k, all_probs.shape[-1])
        vals, idx = all_probs.topk(k, dim=-1)
        result.top_next = [[(tok.decode([int(i)]), float(v)) for v, i in zip(vr, ir)] for vr, ir in zip(vals, idx)]
    if attention is not None:
        layer, h = attention
        result.attention = attention_map(model_dir, head, input_ids, layer, h)
        result.attention_title = f"attention, layer {layer}, {'mean of heads' if h is None else f'head {h}'}"
    return result


def attention_map(model_dir: Path, head: str, input_ids: torch.Tensor, layer: int, h: int | None) -> list[list[float]]:
    """Row t: how much position t attends to each earlier position (eager attention returns the weights)."""
    from engine.model import load_exported

    eager = load_exported(model_dir, head, attn_implementation="eager").to(input_ids.device)
    with torch.no_grad():
        att = eager(input_ids=input_ids, output_attentions=True).attentions[layer][0]  # [heads, T, T]
    return (att.mean(0) if h is None else att[h]).float().cpu().tolist()


# ------------------------------------------------------------------------------------------- output

def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _label(t: str) -> str:
    return repr(t)[1:-1] if t.strip() != t or not t.strip() else t


def attribution_png(e: Explanation) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(e.tokens)
    fig, ax = plt.subplots(figsize=(7, max(2.0, 0.28 * n + 1)))
    vals = np.array(e.attributions)
    ax.barh(range(n), vals, color=["#c0392b" if v >= 0 else "#2e6da4" for v in vals])
    ax.set_yticks(range(n), [f"{i}: {_label(t)}" for i, t in enumerate(e.tokens)], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.6)
    name = "integrated gradients" if e.method == "ig" else "gradient x input"
    ax.set_title(f"{name} for {e.target!r} (p={e.target_prob:.3f})", fontsize=9)
    ax.set_xlabel("attribution (target logit)")
    return _png(fig)


def attention_png(e: Explanation) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(e.tokens)
    size = min(12.0, 2.5 + 0.3 * n)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(np.array(e.attention), cmap="viridis", vmin=0.0)
    labels = [_label(t) for t in e.tokens]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("attended position (key)")
    ax.set_ylabel("position (query)")
    ax.set_title(e.attention_title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _png(fig)


def _shade(v: float, scale: float) -> str:
    a = min(1.0, abs(v) / scale) if scale > 0 else 0.0
    rgb = "192,57,43" if v >= 0 else "46,109,164"
    return f"background: rgba({rgb},{0.85 * a:.3f})"


def render_html(e: Explanation, images: dict[str, bytes], model: str, text: str) -> str:
    scale = max((abs(v) for v in e.attributions), default=0.0)
    spans = "".join(f'<span class="tok" style="{_shade(v, scale)}" title="{i}: {html.escape(repr(t))} '
                    f'attribution {v:+.4g}">{html.escape(t)}</span>'
                    for i, (t, v) in enumerate(zip(e.tokens, e.attributions)))
    method = "integrated gradients" if e.method == "ig" else "gradient x input"
    parts = [f"<h1>ftl explain</h1><p class=meta>model <code>{html.escape(model)}</code> ({e.head}) &middot; "
             f"{method}</p>"]
    if e.head == "cls":
        probs = "".join(f"<tr><td>{html.escape(k)}</td><td>{p:.4f}</td></tr>" for k, p in
                        sorted(e.probs.items(), key=lambda kv: -kv[1]))
        parts.append(f"<h2>Prediction: {html.escape(e.target)} ({e.target_prob:.3f})</h2>"
                     f"<table><tr><th>label</th><th>probability</th></tr>{probs}</table>")
    else:
        parts.append(f"<h2>Next token after the text: {html.escape(repr(e.target))} ({e.target_prob:.3f})</h2>")
    parts.append(f"<h3>Attributions for {html.escape(repr(e.target))}</h3><p class=text>{spans}</p>"
                 "<p class=legend><span style='background:rgba(192,57,43,.6)'>&nbsp;for&nbsp;</span> "
                 "<span style='background:rgba(46,109,164,.6)'>&nbsp;against&nbsp;</span> "
                 "(hover a token for its value)</p>")
    if e.completeness:
        c = e.completeness
        parts.append(f"<p class=meta>completeness: sum of attributions {c['sum_attributions']:.5g} vs "
                     f"f(input) - f(baseline) = {c['difference']:.5g} (error {c['error']:.2g}, {c['steps']} steps, "
                     f"{c['baseline']} baseline)</p>")
    for name, png in images.items():
        parts.append(f"<h3>{html.escape(name)}</h3><img alt='{html.escape(name)}' "
                     f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    if e.top_next:
        head = "".join(f"<th>#{i + 1}</th>" for i in range(len(e.top_next[0])))
        rows = "".join(f"<tr><td>{i}</td><td><code>{html.escape(repr(t))}</code></td>"
                       + "".join(f"<td><code>{html.escape(repr(w))}</code> {p:.3f}</td>" for w, p in top) + "</tr>"
                       for i, (t, top) in enumerate(zip(e.tokens, e.top_next)))
        parts.append(f"<h3>Top next tokens at each position</h3><table><tr><th>pos</th><th>token</th>{head}</tr>"
                     f"{rows}</table>")
    parts.append(f"<h3>Input</h3><pre>{html.escape(text)}</pre>")
    style = ("body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;color:#222}"
             ".tok{padding:2px 1px;border-radius:3px;white-space:pre-wrap;font-family:monospace}"
             ".text{line-height:2em;font-size:1.05em}.meta{color:#555}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:.9em}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>ftl explain</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>\n")


def write(e: Explanation, out: Path, model: str, text: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    images = {"attributions": attribution_png(e)}
    if e.attention is not None:
        images["attention"] = attention_png(e)
    files = {}
    for name, png in images.items():
        files[name] = out / f"{name}.png"
        files[name].write_bytes(png)
    files["html"] = out / "explain.html"
    files["html"].write_text(render_html(e, images, model, text), encoding="utf-8")
    files["json"] = out / "explain.json"
    files["json"].write_text(json.dumps({"model": model, "text": text, **e.__dict__}, indent=1) + "\n",
                             encoding="utf-8")
    return files


def summary(e: Explanation, top: int = 8) -> str:
    lines = []
    if e.head == "cls":
        probs = ", ".join(f"{k} {p:.3f}" for k, p in sorted(e.probs.items(), key=lambda kv: -kv[1]))
        lines.append(f"prediction: {e.target} ({probs})")
    else:
        lines.append(f"next token after the text: {e.target!r} (p={e.target_prob:.3f})")
    name = "integrated gradients" if e.method == "ig" else "gradient x input"
    order = sorted(range(len(e.tokens)), key=lambda i: -abs(e.attributions[i]))[:top]
    lines.append(f"top tokens by |attribution| ({name}, for {e.target!r}):")
    lines += [f"  {i:>4}  {e.tokens[i]!r:<20} {e.attributions[i]:+.4f}" for i in order]
    if e.completeness:
        c = e.completeness
        lines.append(f"completeness: sum {c['sum_attributions']:.5g} vs f(x)-f(baseline) {c['difference']:.5g} "
                     f"(error {c['error']:.2g})")
    if e.top_next:
        lines.append("top next tokens (last positions):")
        for i in range(max(0, len(e.tokens) - 5), len(e.tokens)):
            cand = "  ".join(f"{w!r} {p:.3f}" for w, p in e.top_next[i])
            lines.append(f"  {i:>4}  after {e.tokens[i]!r:<16} {cand}")
    return "\n".join(lines)
