"""Side experiment (issue 3): where do the words that pruning changes land?

    python benchmarks/experiments/change_decomposition.py whisper-tiny.en 0.45,0.5

The sweep shows whisper-base's transcripts changing less than tiny.en's under pruning (agreement
WER) while its reference WER rises as much. This splits each model's WER change into reference
words the dense model had right and the pruned one gets wrong ("broken"), words the dense model
had wrong and the pruned one gets right ("fixed"), and the change in inserted words:
WER change = (broken - fixed + inserted change) / reference words, exactly. Same split, pruning
(OBS, product defaults) and onnxruntime decoding as the sweep. Prints one JSON line per sparsity.
Results: benchmarks/results/side-experiments.json (change_decomposition).
"""
import json
import os
import sys
import tempfile

import jiwer

from femtocc.data import load_dataset, split_by_speaker
from femtocc.backends import make_backend
from femtocc.decode import transcribe
from femtocc.frontend.whisper import load_whisper
from femtocc.passes.calibrate import collect_hessians, prunable_layers
from femtocc.passes.prune import PruneConfig, prune_model
from femtocc.wer import normalize


def hits_and_insertions(reference: str, hypothesis: str) -> tuple[set[int], int]:
    """The reference word positions the hypothesis gets right, and its inserted words."""
    reference, hypothesis = normalize(reference), normalize(hypothesis)
    if not reference.strip():
        return set(), len(hypothesis.split())
    out = jiwer.process_words(reference, hypothesis if hypothesis.strip() else "")
    hits = {i for chunk in out.alignments[0] if chunk.type == "equal" for i in range(chunk.ref_start_idx, chunk.ref_end_idx)}
    return hits, out.insertions


model, sparsities = sys.argv[1], [float(s) for s in sys.argv[2].split(",")]
bundle = load_whisper(model)
calib, evaluation = split_by_speaker(load_dataset(os.environ.get("DATA", "../shared/data/speech/dev")))
hessians = collect_hessians(bundle, calib, prunable_layers(bundle.model))
dense = {x.id: x for x in transcribe(bundle, make_backend(bundle, "onnxruntime"), evaluation)}
words = sum(len(normalize(x.reference).split()) for x in dense.values())
for s in sparsities:
    pruned, _ = prune_model(bundle, PruneConfig(sparsity=s), calib, hessians=hessians)
    with tempfile.TemporaryDirectory() as tmp:
        transcripts = transcribe(pruned, make_backend(pruned, "onnxruntime", export_dir=tmp), evaluation)
    broken = fixed = inserted = changed = 0
    for x in transcripts:
        (dense_hits, dense_ins), (hits, ins) = (hits_and_insertions(x.reference, t) for t in (dense[x.id].hypothesis, x.hypothesis))
        broken += len(dense_hits - hits)
        fixed += len(hits - dense_hits)
        inserted += ins - dense_ins
        changed += int(normalize(x.hypothesis) != normalize(dense[x.id].hypothesis))
    print(json.dumps({"model": model, "sparsity": s, "reference_words": words, "broken": broken, "fixed": fixed,
                      "inserted_change": inserted, "wer_change": round(100 * (broken - fixed + inserted) / words, 3),
                      "utterances_changed": changed, "utterances": len(transcripts)}), flush=True)
