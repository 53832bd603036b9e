"""SALAD stage II's data selection (docs/methods.md#selection), run by the ``select`` stage before it trains.

1. embed the text pool and cluster it ((balanced) k-means): P_web(c) = the pool's share in c;
2. probe: synthesise a few texts per cluster once, and measure each cluster's misalignment M(c)
   with the current (stage-3) model, sharded across ranks and gathered;
3. P_target(c) ∝ P_web(c) M(c)^gamma; draw texts (cluster from P_target, text uniformly inside it)
   until the budget; gamma = 0 is the uniform baseline;
4. synthesise the selection (sharded, resumable item by item) and write its manifest atomically;
5. after training, :func:`remeasure_after` probes the same texts again (same audio, seeds and spans)
   and adds ``M_after`` per cluster, and the mean M before/after over the targeted clusters and the
   others, to the report.

Every step is cached under ``<stage>/selection/`` with the settings it depends on, so a killed or
resumed stage redoes nothing. Rank zero writes; every rank reads after a barrier.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from speechllm.clustering import cluster_shares, kmeans, squared_distances
from speechllm.config import StageConfig
from speechllm.distributed import all_gather_objects, barrier, rank_and_world
from speechllm.embedding import build_embedder
from speechllm.io import atomic_open, atomic_write
from speechllm.manifest import load_audio, load_manifest, write_manifest
from speechllm.measures import misalignment_forgetting
from speechllm.model import SpeechLLM
from speechllm.selection import draw_selection, selection_histogram, target_distribution
from speechllm.sequences import speech_and_text_views
from speechllm.synthesis import SynthesisItem, chunk_words, manifest_rows, synthesize_items


def _key(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(path: Path, key: str) -> Any | None:
    if path.is_file():
        data = torch.load(path, weights_only=False) if path.suffix == ".pt" else json.loads(path.read_text())
        if data.get("key") == key:
            return data
    return None


def _save(path: Path, data: dict) -> None:
    if path.suffix == ".pt":
        with atomic_open(path, "wb") as f:
            torch.save(data, f)
    else:
        atomic_write(path, json.dumps(data, indent=1))


def _rank_zero_computes(path: Path, key: str, compute) -> Any:
    """Rank zero computes (unless cached) and saves; every rank loads after a barrier."""
    rank, _ = rank_and_world()
    if rank == 0 and _cached(path, key) is None:
        _save(path, {"key": key, **compute()})
    barrier()
    return _cached(path, key)


def cluster_pool(texts: list[str], cfg, out: Path, pool_key: dict) -> dict:
    sel = cfg.selection
    key = _key({"pool": pool_key, "embedder": sel.embedder, "k": sel.clusters, "balanced": sel.balanced,
                "iters": sel.kmeans_iters, "seed": sel.seed})

    def compute() -> dict:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        embeddings = build_embedder(sel.embedder, device=device).encode(texts, progress=True).to(device)
        k = min(sel.clusters, len(texts))
        centroids, assignment = kmeans(embeddings, k, iters=sel.kmeans_iters, seed=sel.seed, balanced=sel.balanced)
        return {"assignment": assignment.cpu(), "centroids": centroids.cpu(), "k": k}

    return _rank_zero_computes(out / "clusters.pt", key, compute)


def _file_key(path: str) -> dict:
    """What a cached step keyed by a manifest depends on: its path, size and modification time (a source
    string that is not a file: its text alone)."""
    if not Path(path).is_file():
        return {"path": path}
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime": stat.st_mtime_ns}


def heldout_clusters(cfg, out: Path, clusters: dict) -> dict[str, dict[str, int]]:
    """Set name -> document id -> the pool cluster nearest it (the pool's embedder and centroids), for every
    ``measures.sets`` set: so held-out M can be read per cluster, e.g. over the clusters selection targeted
    (``stages report``). Cached in ``heldout_clusters.json``."""
    sel, sets = cfg.selection, cfg.measures.sets
    key = _key({"clusters": clusters["key"], "sets": {name: _file_key(path) for name, path in sets.items()}})

    def compute() -> dict:
        embedder = build_embedder(sel.embedder, device="cpu")
        centroids = clusters["centroids"].float().cpu()
        out_sets = {}
        for name, path in sets.items():
            docs = load_manifest(path)
            if not docs:
                out_sets[name] = {}
                continue
            nearest = squared_distances(embedder.encode([d.text for d in docs], progress=False).float(), centroids)
            out_sets[name] = {d.id: int(c) for d, c in zip(docs, nearest.argmin(dim=1).tolist())}
        return {"sets": out_sets}

    return _rank_zero_computes(out / "heldout_clusters.json", key, compute)["sets"]


def synthesis_items(indices: list[int], ids: list[str], texts: list[str], prefix: str, cfg) -> list[SynthesisItem]:
    sel = cfg.selection
    rng = random.Random(f"{sel.seed}/{prefix}")
    return [SynthesisItem(f"{prefix}-{ids[i]}", texts[i], sel.voices[n % len(sel.voices)],
                          chunks=chunk_words(texts[i], tuple(sel.chunk_words), rng))
            for n, i in enumerate(indices)]


@torch.no_grad()
def probe_misalignment(model: SpeechLLM, cfg: StageConfig, probes: list[SynthesisItem], folder: Path,
                       results: dict[str, dict], root=None) -> dict[str, dict]:
    """Per probe item (those in ``results``: this rank's shard): ``m_sum``/``m_count`` with the current
    model; with ``root`` (FSDP's :class:`speechllm.sharding.StepRoot`) each batch runs inside it."""
    distill, out = cfg.distill, {}
    shard = [p for p in probes if p.id in results]
    batch = cfg.measures.batch_size
    rank, _ = rank_and_world()

    def measure(items: list[SynthesisItem]) -> list[dict]:
        views = speech_and_text_views(
            model, [load_audio(folder / p.audio, model.encoder.sample_rate) for p in items],
            [results[p.id]["words"] for p in items], [p.text for p in items], [p.text for p in items],
            [torch.Generator().manual_seed(int(hashlib.sha1(p.id.encode()).hexdigest()[:8], 16)) for p in items],
            fmt=distill.format, text_words=tuple(distill.text_span_words), speech_words=tuple(distill.speech_span_words))
        return misalignment_forgetting(model, views)

    for start in tqdm(range(0, len(shard), batch), desc="probe misalignment", unit="batch", disable=rank != 0):
        items = shard[start : start + batch]
        rows = measure(items) if root is None else root(measure, items)
        out.update({p.id: {"m_sum": r["m_sum"], "m_count": r["m_count"]} for p, r in zip(items, rows)})
    return out


LABELS = ("topic", "source")  # the pool fields the report counts per cluster and in the selection


def load_pool(cfg) -> tuple[list[str], list[str], dict[str, list[str]], dict]:
    """The pool's ids, texts, labels (``LABELS`` field -> its value per text, "" where absent) and the
    key its cached steps depend on."""
    sel = cfg.selection
    pool = load_manifest(sel.pool)
    pool_key = _file_key(sel.pool)
    labels = {name: [str(u.meta.get(name, "")) for u in pool] for name in LABELS}
    return [u.id for u in pool], [u.text for u in pool], labels, pool_key


def probe_set(cfg, out: Path, ids: list[str], texts: list[str], clusters: dict) -> dict:
    """The probes (a seeded few texts per cluster, never selected later), synthesised once under
    ``<out>/probes``: ``items``, ``index`` (pool indices), ``cluster_of`` (probe id -> cluster),
    ``results`` (this rank's synthesis results), ``folder`` and ``key`` (what their M depends on, but
    the model). Deterministic: the probe after training is the same set, audio and ids."""
    sel = cfg.selection
    rank, world = rank_and_world()
    k, assignment = clusters["k"], clusters["assignment"]
    rng = random.Random(sel.seed)
    members = [torch.nonzero(assignment == c).flatten().tolist() for c in range(k)]
    index = [i for c in range(k) for i in rng.sample(members[c], min(sel.probe_per_cluster, len(members[c])))]
    items = synthesis_items(index, ids, texts, "probe", cfg)
    folder = out / "probes"
    results = synthesize_items(items, folder, workers=sel.workers, rank=rank, world_size=world,
                               progress=rank == 0, desc="tts probes")
    barrier()
    key = _key({"clusters": clusters["key"], "probes": [p.id for p in items], "voices": list(sel.voices),
                "distill": dict(cfg.distill)})
    return {"items": items, "index": index, "cluster_of": {p.id: int(assignment[i]) for p, i in zip(items, index)},
            "results": results, "folder": folder, "key": key, "k": k}


def cluster_misalignment(model: SpeechLLM, cfg: StageConfig, probes: dict, root=None) -> dict:
    """M(c) over the probes of each cluster with ``model`` (every rank takes part, every rank gets it):
    ``M`` (k,), ``positions`` (k,) and the per-probe ``items``. The same model gives the same values:
    each probe's spans come from a generator seeded by its id, and the model is put in eval mode.
    ``root``: the FSDP root, under FSDP, where every rank measures every probe: a sharded forward
    gathers weights on every rank, so the ranks must run the same batches, and the probes are few."""
    was_training = model.training
    model.eval()
    results = probes["results"]
    if root is not None:  # every probe's synthesis result, on every rank (all finished: reads only)
        results = synthesize_items(probes["items"], probes["folder"], workers=1, progress=False)
    per_item: dict[str, dict] = {}
    try:
        for part in all_gather_objects(probe_misalignment(model, cfg, probes["items"], probes["folder"],
                                                          results, root)):
            per_item.update(part)
    finally:
        model.train(was_training)
    k, cluster_of = probes["k"], probes["cluster_of"]
    sums, counts = [0.0] * k, [0] * k
    for pid in sorted(per_item):
        sums[cluster_of[pid]] += per_item[pid]["m_sum"]
        counts[cluster_of[pid]] += per_item[pid]["m_count"]
    return {"M": [s / c if c else 0.0 for s, c in zip(sums, counts)], "positions": counts,
            "items": dict(sorted(per_item.items()))}


def run_selection(model: SpeechLLM, cfg: StageConfig, out: Path, *, natural_seconds: float,
                  exclude_texts: set[str], root=None) -> dict:
    """Run (or reuse) the whole selection; returns the report (with ``manifest``, the synthetic set).
    ``root``: the FSDP root, under FSDP."""
    sel = cfg.selection
    rank, world = rank_and_world()
    ids, texts, labels, pool_key = load_pool(cfg)

    clusters = cluster_pool(texts, cfg, out, pool_key)
    k, assignment = clusters["k"], clusters["assignment"]
    p_web = cluster_shares(assignment, k)
    heldout_clusters(cfg, out, clusters)

    probes = probe_set(cfg, out, ids, texts, clusters)
    probe_idx = probes["index"]
    # The model is the stage's starting point (init_from); a new one means a new stage directory.
    m_key = probes["key"]
    if _cached(out / "misalignment.json", m_key) is None:
        measured = cluster_misalignment(model, cfg, probes, root)
        if rank == 0:
            _save(out / "misalignment.json", {"key": m_key, **measured})
        barrier()
    m = torch.tensor(_cached(out / "misalignment.json", m_key)["M"], dtype=torch.float64)

    p_target = target_distribution(p_web, m, sel.gamma)
    n_words = [len(t.split()) for t in texts]
    costs = {"texts": [1.0] * len(texts), "words": [float(n) for n in n_words]}.get(
        sel.budget_unit, [n / sel.words_per_second for n in n_words])
    if sel.budget_unit not in ("texts", "words", "seconds", "fraction"):
        raise ValueError(f"selection.budget_unit must be texts | words | seconds | fraction, not {sel.budget_unit!r}")
    budget = sel.budget * natural_seconds if sel.budget_unit == "fraction" else sel.budget
    exclude = set(probe_idx) | {i for i, t in enumerate(texts) if " ".join(t.split()) in exclude_texts}
    chosen = draw_selection(assignment, p_target, costs, budget, seed=sel.seed, exclude=exclude)

    selected = synthesis_items(chosen, ids, texts, "sel", cfg)
    synth_dir = out / "synthetic"
    synthesize_items(selected, synth_dir, workers=sel.workers, rank=rank, world_size=world,
                     progress=rank == 0, desc="tts selection")
    barrier()
    manifest = synth_dir / "selected.jsonl"
    report = selection_report(k, p_web, m, p_target, assignment, chosen, texts, labels, budget, costs, sel)
    report["manifest"] = str(manifest)
    if rank == 0:
        results = synthesize_items(selected, synth_dir, workers=1, progress=False)  # all finished: reads only
        extra = {item.id: {**{name: values[i] for name, values in labels.items()}, "cluster": int(assignment[i])}
                 for item, i in zip(selected, chosen)}
        write_manifest(manifest, manifest_rows(selected, results, extra))
        report["synthesised_seconds"] = round(sum(r["duration"] for r in results.values()), 1)
        _save(out / "report.json", report)
        atomic_write(out / "report.md", report_markdown(report))
    barrier()
    return json.loads((out / "report.json").read_text())


def selection_report(k, p_web, m, p_target, assignment, chosen, texts, labels, budget, costs, sel) -> dict:
    """Per cluster (by M, highest first): size, P_web, M, P_target, the texts selected and their cost,
    ``targeted`` (it received more than its uniform share of what was spent: cost > P_web * total),
    its top topics and sources (``labels``, see :func:`load_pool`) and examples; and the topics and
    sources of the selection."""
    hist = selection_histogram(assignment, torch.tensor(chosen, dtype=torch.long), k).tolist()
    spent = [0.0] * k
    for i in chosen:
        spent[int(assignment[i])] += costs[i]
    total = sum(spent)
    clusters = []
    for c in range(k):
        members = torch.nonzero(assignment == c).flatten().tolist()
        clusters.append({"cluster": c, "size": len(members), "p_web": float(p_web[c]), "M": float(m[c]),
                         "p_target": float(p_target[c]), "selected": hist[c], "selected_cost": round(spent[c], 2),
                         "targeted": bool(spent[c] > float(p_web[c]) * total + 1e-9),
                         **{f"{name}s": [{name: t, "share": round(n / max(len(members), 1), 3)}
                                         for t, n in Counter(values[i] for i in members).most_common(3)]
                            for name, values in labels.items()},
                         "examples": [texts[i][:120] for i in members[:2]]})
    return {"gamma": sel.gamma, "clusters_k": k, "budget": budget, "budget_unit": sel.budget_unit,
            "selected": len(chosen), "selected_cost": round(sum(costs[i] for i in chosen), 2),
            **{f"selected_{name}s": dict(Counter(values[i] for i in chosen).most_common())
               for name, values in labels.items()},
            "clusters": sorted(clusters, key=lambda r: -r["M"])}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def after_summary(clusters: list[dict]) -> dict:
    """Mean M before and after training (unweighted over clusters) for the clusters selection targeted,
    the others and all of them; ``change`` is after - before (None for an empty group)."""
    out = {}
    for group, members in (("targeted", [c for c in clusters if c.get("targeted")]),
                           ("others", [c for c in clusters if not c.get("targeted")]), ("all", clusters)):
        before, after = _mean([c["M"] for c in members]), _mean([c["M_after"] for c in members])
        out[group] = {"clusters": len(members), "M": before, "M_after": after,
                      "change": None if before is None else after - before}
    return out


def with_after(report: dict, m_after: list[float], step: int) -> dict:
    """The report with ``M_after`` on each cluster and the ``M_after_summary`` (see :func:`after_summary`)."""
    clusters = [{**c, "M_after": float(m_after[c["cluster"]])} for c in report["clusters"]]
    return {**report, "clusters": clusters, "M_after_step": step, "M_after_summary": after_summary(clusters)}


def remeasure_after(model: SpeechLLM, cfg: StageConfig, out: Path, step: int, root=None) -> dict:
    """After training: M(c) again on the same probes (audio, span seeds, ids), so the change is the
    training's; cached in ``misalignment_after.json`` (keyed by the probes and ``step``), added to
    ``report.{json,md}``. Every rank takes part (``root``: the FSDP root, under FSDP); returns the
    updated report."""
    rank, _ = rank_and_world()
    ids, texts, _, pool_key = load_pool(cfg)
    clusters = cluster_pool(texts, cfg, out, pool_key)  # cached by run_selection
    probes = probe_set(cfg, out, ids, texts, clusters)  # already synthesised: reads only
    key = _key({"probes": probes["key"], "step": step})
    if _cached(out / "misalignment_after.json", key) is None:
        measured = cluster_misalignment(model, cfg, probes, root)
        if rank == 0:
            _save(out / "misalignment_after.json", {"key": key, "step": step, **measured})
        barrier()
    m_after = _cached(out / "misalignment_after.json", key)["M"]
    report = with_after(json.loads((out / "report.json").read_text()), m_after, step)
    if rank == 0:
        _save(out / "report.json", report)
        atomic_write(out / "report.md", report_markdown(report))
    barrier()
    return report


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def report_markdown(report: dict) -> str:
    after = "M_after_summary" in report
    lines = [f"# Selection (gamma {report['gamma']}, K {report['clusters_k']})", "",
             f"{report['selected']} texts selected for a budget of {report['budget']:.1f} {report['budget_unit']}"
             f" ({report.get('synthesised_seconds', 0)} s synthesised).", "",
             "| cluster | M | " + ("M after | " if after else "")
             + "P_web | P_target | selected | top topics | sources | example |",
             "|---|---|" + ("---|" if after else "") + "---|---|---|---|---|---|"]
    for r in report["clusters"]:
        topics = ", ".join(f"{t['topic']} {t['share']:.0%}" for t in r["topics"])
        sources = ", ".join(f"{t['source'] or '-'} {t['share']:.0%}" for t in r.get("sources", []))
        example = r["examples"][0].replace("|", "/") if r["examples"] else ""
        lines.append(f"| {r['cluster']} | {r['M']:.4f} | " + (f"{r['M_after']:.4f} | " if after else "")
                     + f"{r['p_web']:.3f} | {r['p_target']:.3f} | {r['selected']} | {topics} | {sources} | {example} |")
    lines += ["", "Selected topics: " + ", ".join(f"{t} {n}" for t, n in report["selected_topics"].items())]
    if any(report.get("selected_sources", {})):
        lines += ["", "Selected sources: " + ", ".join(f"{t} {n}" for t, n in report["selected_sources"].items())]
    if after:
        lines += ["", f"Mean M over clusters, before -> after training (step {report['M_after_step']}):"]
        for group, g in report["M_after_summary"].items():
            lines.append(f"- {group} ({g['clusters']} clusters): {_fmt(g['M'])} -> {_fmt(g['M_after'])}"
                         f" (change {_fmt(g['change'], '+.4f')})")
    return "\n".join(lines) + "\n"


def seconds_of(manifest: str) -> float:
    """Speech seconds of a manifest (its `duration` fields)."""
    return sum(u.duration or 0.0 for u in load_manifest(manifest, require_audio=True))

