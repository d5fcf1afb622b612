"""Fine-tuning a pruned Whisper by distillation from the dense model, keeping its sparsity pattern.

The student (pruned) learns to match the teacher (dense) on the calibration utterances:

* decoder: KL divergence from the teacher's next-token distribution, teacher-forced on the
  teacher's greedy transcript (prompt + tokens + end of text);
* encoder: mean squared error to the teacher's encoder output, relative to its mean square.

Adam, a fixed learning rate, mini-batches of utterances in a seeded order. After every step each
pruned weight is multiplied by its mask, so pruned entries stay exactly zero (the pattern, e.g.
pencil8, survives). Teacher targets are computed once per call and kept as float16 log-probs.

Guarantees: the zeros of every prunable layer are the same before and after; the same inputs and
seed give the same weights (CPU, deterministic algorithms).
"""

from __future__ import annotations

import time

import numpy as np

from femtocc.data import Utterance


def finetune(student, teacher, utts: list[Utterance], tokens: dict[str, list[int]], epochs: int = 1,
             lr: float = 5e-5, batch: int = 4, seed: int = 0, progress: bool = False) -> dict:
    """Distil ``teacher`` into ``student`` (bundles) in place; returns loss and timing statistics."""
    import torch
    import torch.nn.functional as F
    from transformers.modeling_outputs import BaseModelOutput

    from femtocc.passes.calibrate import _features, prunable_layers
    from femtocc.progress import progress as steps

    start = time.perf_counter()
    torch.manual_seed(seed)
    settings = teacher.decode
    feats = {u.id: torch.from_numpy(_features(teacher, u.audio())) for u in utts}
    seqs = {u.id: list(settings.prompt) + list(tokens[u.id]) + [settings.eot] for u in utts}

    def batches(order):
        for i in range(0, len(order), batch):
            ids = order[i : i + batch]
            length = max(len(seqs[k]) for k in ids)
            inp = torch.tensor([seqs[k] + [settings.eot] * (length - len(seqs[k])) for k in ids])
            valid = torch.tensor([[j < len(seqs[k]) - 1 for j in range(length)] for k in ids])
            yield ids, torch.cat([feats[k] for k in ids]), inp, valid

    tm = teacher.model
    targets = {}
    with torch.no_grad():
        for ids, x, inp, _ in batches([u.id for u in utts]):
            enc = tm.model.encoder(x).last_hidden_state
            logp = F.log_softmax(tm(encoder_outputs=BaseModelOutput(last_hidden_state=enc), decoder_input_ids=inp).logits.float(), -1)
            for j, k in enumerate(ids):
                targets[k] = (enc[j : j + 1].clone(), logp[j : j + 1].half())

    model = student.model
    layers = prunable_layers(model)
    masks = {n: (m.weight.detach() != 0).to(m.weight.dtype) for n, m in layers.items()}
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    history = []
    try:
        for epoch in range(epochs):
            order = [utts[i].id for i in rng.permutation(len(utts))]
            total = 0.0
            for ids, x, inp, valid in steps(list(batches(order)), f"finetune {epoch + 1}/{epochs}", "batch",
                                            enabled=progress):
                enc_t = torch.cat([targets[k][0] for k in ids])
                length = inp.shape[1]
                logp_t = torch.cat([F.pad(targets[k][1].float(), (0, 0, 0, length - targets[k][1].shape[1])) for k in ids])
                enc = model.model.encoder(x).last_hidden_state
                logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=enc), decoder_input_ids=inp).logits.float()
                logp = F.log_softmax(logits, -1)
                kl = (logp_t.exp() * (logp_t - logp)).sum(-1)[valid].mean()
                mse = ((enc - enc_t) ** 2).mean() / (enc_t**2).mean()
                loss = kl + mse
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for n, m in layers.items():
                        m.weight.mul_(masks[n])
                total += float(loss.detach()) * len(ids)
            history.append(total / len(utts))
    finally:
        model.eval()
    return {"epochs": epochs, "lr": lr, "batch": batch, "utterances": len(utts), "loss_per_epoch": history,
            "seconds": time.perf_counter() - start}
