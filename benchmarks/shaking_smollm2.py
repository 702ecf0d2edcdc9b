"""CypherTalk shaking on SmolLM2-135M-Instruct: accuracy, inversion-attack recovery and time per phase.

One process runs every row so that time ratios are comparable (this machine's CPUs are shared):

1. ``unshaken``: LoRA tuning (r=8, q/v) on tweets sentiment, plain inference;
2. ``horizontal``: the same tuning under a horizontal-only key (EmbeddingShaking), private inference;
3. ``search``: operator chains sampled from the search space, each scored by utility (validation accuracy after
   ``--search-tune-steps`` LoRA steps of private tuning, no implantation; with 0 steps, label-word agreement with
   the unshaken model), attack success (max top-1 of A1-A4 over every shaken table the cloud holds: the
   embedding and an untied head) and cost (key generation, tuning, validation inference);
4. ``horizontal+vertical``: the search's chosen setting, key implantation (ShakeRecovery on BBC News text,
   awareness then function recovery, first 2 blocks), the same tuning, private inference, then horizontal
   and full weight recovery;
5. ``dp-sgd``: the same tuning with OpacusDP at each epsilon.

Run (about 15-25 min on 2 shared CPU cores with the defaults):

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 .venv/bin/python benchmarks/shaking_smollm2.py --out runs/shaking_smollm2
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from privtune.attacks import EmbeddingRegressionProbe, hidden_states, model_attack_report, recovery_rate, token_counts
from privtune.callbacks.embedding_shaking import EmbeddingShaking
from privtune.datamodules import BBCNews, LMCorpus, TweetsSentiment
from privtune.models import load_model
from privtune.models.scoring import label_word_logits
from privtune.modules import TextClassifier
from privtune.modules.recovery import ShakeRecovery
from privtune.shaking import ShakeKey, recover_model, shake_model
from privtune.shaking.cost import CostLedger
from privtune.shaking.search import (
    DEFAULT_GRID,
    SearchSpace,
    callback_init_args,
    run_search,
    sample_candidates,
    save_search,
    write_setting_config,
)

MODEL = "smollm2-135m-instruct"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_data(args: argparse.Namespace) -> pl.LightningDataModule:
    cls = TweetsSentiment if args.dataset == "tweets" else BBCNews
    return cls(train_size=args.train_size, val_size=args.val_size, test_size=args.test_size,
               max_length=args.max_length, batch_size=args.batch_size, eval_batch_size=16, seed=0)  # fmt: skip


def trainer(args: argparse.Namespace, callbacks: list) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, max_epochs=100, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks, deterministic=True)  # fmt: skip


@torch.no_grad()
def scores(
    model: torch.nn.Module, dm: pl.LightningDataModule, split: str, key: ShakeKey | None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Label-word scores [N, C] and labels [N] over a split; ids mapped by ``key`` (private inference)."""
    model.eval()
    label_ids = dm.label_token_ids if key is None else key.encode_ids(dm.label_token_ids)
    loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
    out, labels = [], []
    start = time.perf_counter()
    for batch in loader:
        ids = batch["input_ids"] if key is None else key.encode_ids(batch["input_ids"])
        out.append(label_word_logits(model, ids, batch["attention_mask"], label_ids))
        labels.append(batch["labels"])
    return torch.cat(out), torch.cat(labels), time.perf_counter() - start


def accuracy(s: torch.Tensor, y: torch.Tensor) -> float:
    return float((s.argmax(-1) == y).float().mean())


def tune(
    args: argparse.Namespace, dm: pl.LightningDataModule, model: str, callbacks: list
) -> tuple[TextClassifier, float]:
    pl.seed_everything(0)
    module = TextClassifier(model=model, tuning="lora", lr=args.lr, lora_r=8, lora_alpha=16)
    tr = trainer(args, callbacks)
    start = time.perf_counter()
    tr.fit(module, datamodule=dm)
    return module, time.perf_counter() - start


def traffic_counts(dm: pl.LightningDataModule, key: ShakeKey, vocab: int) -> torch.Tensor:
    ids = [b["input_ids"][b["attention_mask"].bool()] for b in dm.train_dataloader()]
    return token_counts(key.encode_ids(torch.cat(ids))[None], vocab)


def public_counts(vocab: int, tokenizer) -> torch.Tensor:  # noqa: ANN001
    from privtune.data import read_bbc_news

    texts = read_bbc_news().texts[:400]
    return token_counts(tokenizer(texts, add_special_tokens=False)["input_ids"], vocab)


def learned_inversion(
    plain: torch.nn.Module, shaken: torch.nn.Module, key: ShakeKey, dm, tokenizer, layer: int
) -> float:  # noqa: ANN001
    """Top-1 recovery of the private tweets' tokens from the shaken model's hidden states after ``layer``."""
    from privtune.data import read_bbc_news

    table = plain.get_input_embeddings().weight.detach()
    pub = tokenizer(read_bbc_news().texts[400:416], add_special_tokens=False, truncation=True, max_length=48,
                    padding="max_length", return_tensors="pt")  # fmt: skip
    h, ids = [], []
    for i in range(0, pub["input_ids"].shape[0], 8):
        x, m = pub["input_ids"][i : i + 8], pub["attention_mask"][i : i + 8]
        h.append(hidden_states(plain, x, layer, m)[m.bool()])
        ids.append(x[m.bool()])
    probe = EmbeddingRegressionProbe(ridge=1e-3).fit(torch.cat(h), torch.cat(ids), table)
    hs, truth = [], []
    for n, batch in enumerate(dm.test_dataloader()):
        if n >= 2:
            break
        m = batch["attention_mask"]
        hs.append(hidden_states(shaken, key.encode_ids(batch["input_ids"]), layer, m)[m.bool()])
        truth.append(batch["input_ids"][m.bool()])
    return recovery_rate(probe.predict(torch.cat(hs), table), torch.cat(truth))["top1"]


def _table_a1(attacks: dict) -> str:
    """A1 top-1 per table the cloud holds (``embedding``, and ``head`` when untied)."""
    if "A1" in attacks:  # results written before the head was attacked: the embedding only
        return f"{100 * attacks['A1']['top1']:.1f} % (embedding only)"
    parts = [f"{name} {100 * rep['A1']['top1']:.1f} %" for name, rep in attacks.items() if name != "A"]
    return " / ".join(parts) if parts else "n/a (plain ids)"


def markdown_table(results: dict) -> str:
    """The README table: accuracy, attack recovery and time per phase of every row in ``results.json``."""
    cost = results.get("cost", {}).get("seconds", {})
    lines = [
        "| row | test acc | NN token recovery (A1) | max A1-A4 | learned inversion | tuning s | inference s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in results["rows"].items():
        attacks = row.get("attacks", {})
        inv = row.get("learned_inversion_top1")
        cells = [
            name,
            f"{row['acc']:.3f}",
            _table_a1(attacks) if attacks else "n/a (plain ids)",
            f"{100 * row['attack_top1']:.1f} %",
            "" if inv is None else f"{100 * inv:.1f} %",
            f"{row['tune_s']:.0f}",
            f"{row['infer_s']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    phases = " · ".join(f"{k} {v:.1f} s" for k, v in cost.items())
    return "\n".join(lines) + f"\n\nTime per phase: {phases}\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/shaking_smollm2")
    p.add_argument("--dataset", choices=["tweets", "bbc_news"], default="tweets")
    p.add_argument("--train-size", type=int, default=320)
    p.add_argument("--val-size", type=int, default=48)
    p.add_argument("--test-size", type=int, default=192)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--implant-steps", type=int, default=20)
    p.add_argument("--implant-lr", type=float, default=1e-4)
    p.add_argument("--implant-k", type=int, default=2, help="first blocks trained by the implantation")
    p.add_argument("--search-budget", type=int, default=10)
    p.add_argument("--search-seeds", type=int, default=2)
    p.add_argument("--search-tune-steps", type=int, default=0,
                   help="LoRA steps of each search trial (utility = validation accuracy after them); 0: utility = "
                   "zero-shot agreement with the unshaken model, no tuning")  # fmt: skip
    p.add_argument("--tau-attack", type=float, default=0.05)
    p.add_argument("--attack-rows", type=int, default=400, help="hidden rows scored by the table attacks")
    p.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 3.0, 8.0])
    p.add_argument("--rows", nargs="*", default=["unshaken", "horizontal", "search", "hv", "dp"])
    p.add_argument("--settings", nargs="*", default=[],
                   help='extra hv rows as JSON, e.g. {"name": "laplace4", "operators": ["laplace"], "chain_length": 1, '
                   '"scales": {"laplace": {"kappa": 4}}}')  # fmt: skip
    p.add_argument("--search-json", default=None, help="take the chosen setting from a previous search.json")
    p.add_argument("--table", default=None, help="print the Markdown table of an existing results.json and exit")
    args = p.parse_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())))
        return
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    (out / "keys").mkdir(parents=True, exist_ok=True)
    ledger = CostLedger()
    results: dict = {"args": vars(args), "rows": {}}

    dm = make_data(args)
    base = load_model(MODEL).eval()
    dm.trainer = None
    dm.tokenizer_name = MODEL
    dm.setup("fit")
    tokenizer = dm.tokenizer
    vocab = base.get_input_embeddings().weight.shape[0]
    table = base.get_input_embeddings().weight.detach()
    pub_counts = public_counts(vocab, tokenizer)

    def save() -> None:
        results["cost"] = ledger.to_dict()
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    # ---------------------------------------------------------------- 1. unshaken
    if "unshaken" in args.rows:
        log("unshaken: LoRA tuning")
        module, sec = tune(args, dm, MODEL, [])
        ledger.add("plain_tuning", sec, args.steps)
        s, y, inf = scores(module.model, dm, "test", None)
        ledger.add("plain_inference", inf, len(y))
        results["rows"]["unshaken"] = {"acc": accuracy(s, y), "tune_s": sec, "infer_s": inf, "attack_top1": 1.0}
        log(f"unshaken acc={accuracy(s, y):.4f} tune={sec:.1f}s infer={inf:.1f}s")
        del module
        gc.collect()
        save()

    # ---------------------------------------------------------------- 2. horizontal only
    if "horizontal" in args.rows:
        log("horizontal: LoRA tuning under a horizontal-only key")
        cb = EmbeddingShaking(str(out / "keys" / "horizontal.json"), chain_length=0, recovery="none")
        module, sec = tune(args, dm, MODEL, [cb])
        key = cb.key
        s, y, inf = scores(module.model, dm, "test", key)
        rep = model_attack_report(module.model, base, key.inv_perm, known=key.pinned,
                                  shaken_counts=traffic_counts(dm, key, vocab), public_counts=pub_counts,
                                  sample=args.attack_rows)  # fmt: skip
        inv = learned_inversion(base, module.model, key, dm, tokenizer, layer=2)
        recover_model(module.model, key, "horizontal")
        s2, y2, _ = scores(module.model, dm, "test", None)
        row = {"acc": accuracy(s, y), "acc_recovered_horizontal": accuracy(s2, y2), "tune_s": sec, "infer_s": inf,
               "attacks": rep, "attack_top1": rep["A"]["top1"], "learned_inversion_top1": inv,
               "recovered_equals_shaken": bool(torch.equal(s.argmax(-1), s2.argmax(-1)))}  # fmt: skip
        results["rows"]["horizontal"] = row
        log(f"horizontal acc={row['acc']:.4f} A={row['attack_top1']:.4f} inversion={inv:.4f} tune={sec:.1f}s")
        del module
        gc.collect()
        save()

    # ---------------------------------------------------------------- 3. search
    chosen = None
    if args.search_json:
        from privtune.shaking import KeySetting

        previous = json.loads(Path(args.search_json).read_text())
        setting = dict(previous["results"][previous["choice"]]["setting"])
        setting["operators"] = tuple(setting["operators"])
        chosen = KeySetting(**setting)
        results["search"] = {"from": args.search_json, "choice": previous["results"][previous["choice"]]["name"]}
    if "search" in args.rows:
        log("search: operator settings")
        plain_val, yv, _ = scores(base, dm, "val", None)
        plain_probs = plain_val.softmax(-1)
        # On SmolLM2 (d = 576) nearest-neighbour matching survives noise up to a few times the table std, so the
        # noise grid reaches far beyond the default kappa = 0.5 (measured: A1 top-1 ~ 1.0 at kappa <= 2).
        noise = (1.0, 2.0, 4.0, 8.0, 16.0)
        grid = {**DEFAULT_GRID, **dict.fromkeys(("gaussian", "laplace", "dx-fixp"), ("kappa", noise))}
        space = SearchSpace(chain_lengths=(1, 2), grid=grid, implant_steps=(0,))
        candidates = sample_candidates(space, args.search_budget, seed=0)

        trial_args = argparse.Namespace(**{**vars(args), "steps": args.search_tune_steps})

        def trial(cand, seed: int) -> dict[str, float]:  # noqa: ANN001
            tuned = args.search_tune_steps > 0
            if cand.setting is None:
                if not tuned:
                    return {"utility": 1.0, "attack": 1.0, "cost": 0.0, "val_acc": accuracy(plain_val, yv)}
                t0 = time.perf_counter()
                module, _ = tune(trial_args, dm, MODEL, [])
                sv, _, _ = scores(module.model, dm, "val", None)
                acc = accuracy(sv, yv)
                return {"utility": acc, "attack": 1.0, "cost": time.perf_counter() - t0, "val_acc": acc}
            t0 = time.perf_counter()
            key = ShakeKey.generate(
                cand.setting, table, pinned=tokenizer.all_special_ids, seed=f"search-{seed}-{cand.name}"
            )
            if tuned:  # a short private tuning of the shaken model (no implantation), utility = val accuracy
                key_path = out / "keys" / "search-trial.json"
                key.save(key_path)
                module, _ = tune(trial_args, dm, MODEL, [EmbeddingShaking(str(key_path), recovery="none")])
                key_path.unlink()
                model = module.model
            else:
                model = copy.deepcopy(base)
                shake_model(model, key)
            sv, _, _ = scores(model, dm, "val", key)
            cost = time.perf_counter() - t0
            utility = (
                accuracy(sv, yv) if tuned else float(1 - 0.5 * (sv.softmax(-1) - plain_probs).abs().sum(-1).mean())
            )
            rep = model_attack_report(model, base, key.inv_perm, known=key.pinned,
                                      shaken_counts=traffic_counts(dm, key, vocab), public_counts=pub_counts,
                                      sample=args.attack_rows // 2, seed=seed)  # fmt: skip
            del model
            gc.collect()
            per_attack = {f"{name}_{k}_top1": v["top1"] for name, r in rep.items() if name != "A" for k, v in r.items()}
            return {"utility": utility, "attack": rep["A"]["top1"], "cost": cost, "val_acc": accuracy(sv, yv),
                    **per_attack}  # fmt: skip

        search = run_search(trial, candidates, seeds=tuple(range(args.search_seeds)), tau_attack=args.tau_attack)
        save_search(search, out / "search.json")
        best = search["results"][search["choice"]]
        chosen = best.candidate.setting
        results["search"] = {
            "choice": best.to_dict(),
            "front": [search["results"][i].candidate.name for i in search["front"]],
        }
        log(f"search choice: {best.candidate.name} U={best.utility:.3f} A={best.attack:.4f} C={best.cost:.1f}s")
        template = Path(__file__).resolve().parents[1] / "configs" / "shaking" / "smollm2_tweets_private_tuning.yaml"
        if template.is_file():
            write_setting_config(chosen, template, out / "chosen_setting.yaml",
                                 comment=f"Chosen by benchmarks/shaking_smollm2.py: {best.candidate.name}")  # fmt: skip
        save()

    # ---------------------------------------------------------------- 4. horizontal + vertical with recovery
    if "hv" in args.rows:
        from privtune.shaking import KeySetting

        if chosen is None:
            chosen = KeySetting(operators=("gaussian",), chain_length=1)
        todo = [("", chosen, True)]
        for extra in args.settings:
            spec = json.loads(extra)
            label = spec.pop("name")
            head_vertical = bool(spec.pop("head_vertical", True))
            setting = KeySetting(**{k: tuple(v) if k == "operators" else v for k, v in spec.items()})
            todo.append((label, setting, head_vertical))
    for label, chosen, head_vertical in todo if "hv" in args.rows else []:
        suffix = f" ({label})" if label else ""
        tag = f"_{label}" if label else ""
        init = {**callback_init_args(chosen), "shake_lm_head_vertical": head_vertical}
        key_path = str(out / "keys" / f"hv{tag}.json")
        log(f"hv: key generation + implantation ({args.implant_steps} steps) with {init}")
        pl.seed_everything(0)
        t0 = time.perf_counter()
        key = ShakeKey.generate(chosen, table, pinned=tokenizer.all_special_ids)
        key.save(key_path)
        ledger.add("keygen" + tag, time.perf_counter() - t0)
        shaker = EmbeddingShaking(key_path, shake_batches=False, recovery="none", **init)
        rec = ShakeRecovery(model=MODEL, awareness_steps=args.implant_steps // 2, k=args.implant_k,
                            lr=args.implant_lr, save_dir=str(out / "implanted"))  # fmt: skip
        corpus = LMCorpus("bbc_news", block_size=args.max_length, batch_size=4, max_train_blocks=4 * args.implant_steps,
                          max_val_blocks=8, tokenizer=MODEL)  # fmt: skip
        tr = pl.Trainer(accelerator="cpu", max_steps=args.implant_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[shaker])  # fmt: skip
        t0 = time.perf_counter()
        tr.fit(rec, datamodule=corpus)
        ledger.add("implant" + tag, time.perf_counter() - t0, args.implant_steps)
        # damage curve on the validation set: shaken without recovery vs after implantation
        raw = copy.deepcopy(base)
        shake_model(raw, key, shake_lm_head_vertical=head_vertical)
        sv_raw, yv, _ = scores(raw, dm, "val", key)
        no_recovery_val = accuracy(sv_raw, yv)
        del raw
        sv_imp, _, _ = scores(rec.model, dm, "val", key)
        implanted_val = accuracy(sv_imp, yv)
        del rec, tr, corpus
        gc.collect()
        log(
            f"hv: private tuning (val acc shaken, no recovery={no_recovery_val:.3f}; "
            f"after implantation={implanted_val:.3f})"
        )
        cb = EmbeddingShaking(key_path, recovery="none", **init)
        module, sec = tune(args, dm, str(out / "implanted"), [cb])
        ledger.add("private_tuning" + tag, sec, args.steps)
        s, y, inf = scores(module.model, dm, "test", key)
        ledger.add("private_inference" + tag, inf, len(y))
        rep = model_attack_report(module.model, base, key.inv_perm, known=key.pinned,
                                  shaken_counts=traffic_counts(dm, key, vocab), public_counts=pub_counts,
                                  sample=args.attack_rows)  # fmt: skip
        inv = learned_inversion(base, module.model, key, dm, tokenizer, layer=2)
        full = copy.deepcopy(module.model)
        t0 = time.perf_counter()
        recover_model(module.model, key, "horizontal")
        ledger.add("weight_recovery" + tag, time.perf_counter() - t0)
        s_h, _, _ = scores(module.model, dm, "test", None)
        recover_model(full, key, "full")
        s_f, _, _ = scores(full, dm, "test", None)
        row = {"setting": init, "acc": accuracy(s, y), "acc_recovered_horizontal": accuracy(s_h, y),
               "acc_recovered_full": accuracy(s_f, y), "val_acc_shaken_no_recovery": no_recovery_val,
               "val_acc_after_implantation": implanted_val, "tune_s": sec, "infer_s": inf, "attacks": rep,
               "attack_top1": rep["A"]["top1"], "learned_inversion_top1": inv,
               "recovered_equals_shaken": bool(torch.equal(s.argmax(-1), s_h.argmax(-1)))}  # fmt: skip
        results["rows"]["horizontal+vertical" + suffix] = row
        log(f"hv acc={row['acc']:.4f} full-recovered={row['acc_recovered_full']:.4f} A={row['attack_top1']:.4f} "
            f"inversion={inv:.4f}")  # fmt: skip
        del module, full
        gc.collect()
        save()

    # ---------------------------------------------------------------- 5. DP-SGD
    if "dp" in args.rows:
        from privtune.callbacks.dp_sgd import OpacusDP

        for eps in args.epsilons:
            log(f"dp-sgd: epsilon={eps}")
            cb = OpacusDP(target_epsilon=eps, max_grad_norm=1.0, accountant="prv", steps=args.steps)
            module, sec = tune(args, dm, MODEL, [cb])
            s, y, inf = scores(module.model, dm, "test", None)
            results["rows"][f"dp-sgd eps={eps:g}"] = {"acc": accuracy(s, y), "tune_s": sec, "infer_s": inf,
                                                     "attack_top1": 1.0, "dp": cb.report()}  # fmt: skip
            ledger.add(f"dp_tuning_eps{eps:g}", sec, args.steps)
            log(
                f"dp eps={eps} acc={accuracy(s, y):.4f} sigma={cb.noise_multiplier:.3f} "
                f"eps_spent={cb.epsilon():.3f} tune={sec:.1f}s"
            )
            del module
            gc.collect()
            save()
    save()
    log(f"done: {out / 'results.json'}")


if __name__ == "__main__":
    main()
