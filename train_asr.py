"""
train_asr.py: train asr.py's nano FastConformer-Transducer on the code-switching corpus and compare
output encodings and embeddings, run beside run. Read after asr.py and romanize.py.

    python data/speech/prepare.py                       # the corpus: espeak-ng, a few minutes
    python romanize.py                                  # Roman2Char, from the corpus' text alone
    python train_asr.py config/asr_romanization.py      # characters vs romanized + Roman2Char
    python train_asr.py config/asr_pet.py               # conventional vs PET embeddings
    python train_asr.py config/asr_pet.py --rescore=True --beam=4   # the finished runs, beam search
    python train_asr.py config/asr_pet.py --rescore=True --oracle=True   # ... fed the reference as context
    python asr.py --wav=FILE.wav --init_from=out-asr/char

Every run named in --runs trains the same encoder for the same steps on the same batches (a pure
function of seed and step), and writes out_dir/<run>/ckpt.pt and results.json; the last lines print
the runs side by side. A run is 'char' (Mandarin characters as output tokens), 'roman' (tonal pinyin
pieces, turned into characters by Roman2Char after decoding), or either with '+pet' (the prediction
network's embeddings composed from pronunciation features).

Scores on held-out sentences: 'val' by the training speakers, 'test' by speakers never heard. The mixed
error rate (MER) counts edits over units, a Mandarin character or an English word each. The chain
statistic is P(error at a reference unit | the unit before it was wrong), beside P(error): an error
that makes the next one likelier shows as the first above the second.
"""
import collections, json, math, os, subprocess, sys, time
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

from asr import ASRConfig, Subsampling, Transducer, load_transducer, token_features, transcribe
from checkpoint import append_log
import romanize
from romanize import build_tokenizer, count_readings, is_mandarin, to_chars_batch

# -----------------------------------------------------------------------------
# config
data_dir = 'data/speech'       # data/speech/prepare.py's output
out_dir = 'out-asr'            # one folder per run: ckpt.pt, results.json, log.jsonl (rescore_beam*.json)
overwrite = False              # replace runs that out_dir already holds (else refuse, before any work)
runs = 'char'                  # comma-separated runs: char, roman, char+pet, roman+pet
roman2char = 'out-speech/roman2char.pt'  # romanize.py's model, for the 'roman' runs
token_budget = 128             # tokenizer budget split by data share (romanize.build_tokenizer)
steps = 2000                   # optimizer steps per run (about 6 minutes on 2 cores)
batch_size = 16                # utterances per step
learning_rate = 2e-3           # AdamW peak, after a linear warmup, cosine to a tenth
warmup = 100
weight_decay = 1e-3
grad_clip = 1.0
joint_chunk = 4                # frames per chunk of the fused joint (0: the whole (B, T, U + 1, V) logits)
eval_every = 400               # steps between val scores (0: only at the end)
eval_max = 0                   # utterances scored per split (0: all)
memory_budget_mb = 1024        # the joint's memory budget for the batch-size column
beam = 0                       # decoding for the scores: 0 greedy, k a beam search of k hypotheses
rescore = False                # score the finished runs again (e.g. --beam=4) into rescore_beam{beam}.json
oracle = False                 # with rescore: greedy, the prediction network fed the reference (rescore_oracle.json)
seed = 1337
threads = 0                    # torch threads (0: torch's default)
globals().update({k: v for k, v in asdict(ASRConfig()).items() if k not in ('vocab_size', 'pet')})  # model flags
dropout = 0.0                  # the nano model underfits in minutes: no dropout
ctc_weight = 0.3               # the encoder's CTC loss beside the transducer's (val MER 0.73 vs 0.85 at 1000 steps)
config_ranges = {'steps': 'int [1, inf)', 'batch_size': 'int [1, inf)', 'learning_rate': '(0, 1]',
                 'token_budget': 'int [8, inf)', 'joint_chunk': 'int [0, inf)', 'eval_every': 'int [0, inf)',
                 'eval_max': 'int [0, inf)', 'warmup': 'int [0, inf)', 'dropout': '[0, 1)',
                 'memory_budget_mb': '(0, inf)', 'threads': 'int [0, inf)', 'beam': 'int [0, inf)',
                 'pet_share': '[0, inf)'}
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())  # and die()
config = {k: globals()[k] for k in config_keys}
RUN_KINDS = ('char', 'roman', 'char+pet', 'roman+pet')


# -----------------------------------------------------------------------------
# data

class Split:
    """One split of the corpus: int16 audio, utterance offsets, units, pinyin and speakers."""

    def __init__(self, folder, name):
        with np.load(os.path.join(folder, f'{name}.npz')) as z:
            self.audio, self.offsets = z['audio'], z['offsets']
        with open(os.path.join(folder, f'{name}.jsonl')) as f:
            rows = [json.loads(line) for line in f]
        self.units = [r['units'] for r in rows]
        self.pinyin = [r['pinyin'] for r in rows]
        if len(self.offsets) != len(rows) + 1:
            raise ValueError(f'{name}.npz holds {len(self.offsets) - 1} utterances, {name}.jsonl {len(rows)}')

    def __len__(self):
        return len(self.units)

    def waves(self, idx):
        """Waveforms (B, N) in [-1, 1], zero-padded, and their lengths (B,)."""
        pieces = [self.audio[self.offsets[i]:self.offsets[i + 1]] for i in idx]
        lengths = torch.tensor([len(p) for p in pieces])
        wave = torch.zeros(len(pieces), int(lengths.max()))
        for row, p in enumerate(pieces):
            wave[row, :len(p)] = torch.from_numpy(p.astype(np.float32) / 32768)
        return wave, lengths


def load_data(folder):
    if not os.path.exists(os.path.join(folder, 'meta.json')):
        die(f'{folder}/meta.json not found: build the corpus first with python data/speech/prepare.py')
    try:
        data = {name: Split(folder, name) for name in ('train', 'val', 'test')}
    except (OSError, ValueError, KeyError) as e:
        die(f'{folder}: {e} (build it again with python data/speech/prepare.py)')
    data['seen'] = collections.Counter(u for units in data['train'].units for u in units)  # {unit: count}
    pairs, _ = count_readings({'units': u, 'pinyin': p} for u, p in zip(data['train'].units, data['train'].pinyin))
    data['readings'] = collections.defaultdict(set)  # {character: its tonal syllables in the training transcripts}
    for syllable, char in pairs:
        data['readings'][char].add(syllable)
    return data


def targets(tok, split, idx, unknown=None):
    """Label ids (B, U) padded with 0, and their counts (B,). A character that the tokenizer cannot spell
    (never in the training transcripts) raises ValueError, or with unknown given is that one id."""
    ids = [tok.encode(split.units[i], split.pinyin[i], unknown) for i in idx]
    labels = torch.tensor([len(y) for y in ids])
    out = torch.zeros(len(ids), max(1, int(labels.max())), dtype=torch.long)
    for row, y in enumerate(ids):
        out[row, :len(y)] = torch.tensor(y, dtype=torch.long)
    return out, labels


# -----------------------------------------------------------------------------
# scoring: edit-distance alignment, MER, the chain statistic

RARE = 20  # a Mandarin character the training transcripts hold at most this often is rare (PET's long tail)


def align(ref, hyp):
    """For each reference unit, the hypothesis unit the best alignment pairs it with (None: deleted), and
    the edit count (insertions included): Levenshtein's table and its backtrace."""
    n, m = len(ref), len(hyp)
    d = np.zeros((n + 1, m + 1), dtype=np.int64)
    d[:, 0], d[0, :] = np.arange(n + 1), np.arange(m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d[i, j] = min(d[i - 1, j] + 1, d[i, j - 1] + 1, d[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]))
    got, i, j = [None] * n, n, m
    while i > 0:
        if j > 0 and d[i, j] == d[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]):
            got[i - 1] = hyp[j - 1]
            i, j = i - 1, j - 1
        elif d[i, j] == d[i - 1, j] + 1:
            i -= 1
        else:
            j -= 1
    return got, int(d[n, m])


def score(refs, hyps, seen=None, readings=None):
    """MER over all units, CER over Mandarin characters, WER over English words (edits / reference
    units of that kind, from the mixed alignment), and P(error), P(error | previous unit wrong). With
    seen (training counts of units), also the CER of rare characters (seen at most RARE times) and
    P(error | previous unit a rare character). With readings ({character: tonal syllables}), also the
    share of Mandarin units written as a homophone (another character of a syllable they share) and
    P(error | previous unit written as a homophone): the error chains PET is meant to break."""
    edits = units = 0
    kinds = {True: [0, 0], False: [0, 0]}  # is_mandarin -> [wrong, count]
    after_wrong, rare, after_rare = [0, 0], [0, 0], [0, 0]  # [wrong, count] of units of each condition
    homophone, after_homophone = [0, 0], [0, 0]
    is_rare = lambda u: seen is not None and is_mandarin(u) and seen.get(u, 0) <= RARE  # noqa: E731
    sounds = lambda u: readings.get(u, set()) if readings is not None else set()  # noqa: E731
    for ref, hyp in zip(refs, hyps):
        got, e = align(ref, hyp)
        wrong = [g != u for u, g in zip(ref, got)]
        homo = [is_mandarin(u) and g not in (None, u) and bool(sounds(u) & sounds(g)) for u, g in zip(ref, got)]
        edits, units = edits + e, units + len(ref)
        for k, (unit, w) in enumerate(zip(ref, wrong)):
            for pair, counts in ((kinds[is_mandarin(unit)], True), (after_wrong, k > 0 and wrong[k - 1]),
                                 (rare, is_rare(unit)), (after_rare, k > 0 and is_rare(ref[k - 1])),
                                 (after_homophone, k > 0 and homo[k - 1])):
                if counts:
                    pair[0] += w
                    pair[1] += 1
            if readings is not None and is_mandarin(unit):  # [written as a homophone, Mandarin units]
                homophone[0] += homo[k]
                homophone[1] += 1
    rate = lambda pair: pair[0] / max(pair[1], 1)  # noqa: E731
    out = {'mer': edits / max(units, 1), 'cer_zh': rate(kinds[True]), 'wer_en': rate(kinds[False]),
           'p_error': rate([kinds[True][0] + kinds[False][0], units]), 'p_error_after_error': rate(after_wrong),
           'units': units}
    if seen is not None:
        out.update(cer_rare=rate(rare), p_error_after_rare=rate(after_rare), rare_units=rare[1])
    if readings is not None:
        out.update(homophones=rate(homophone), p_error_after_homophone=rate(after_homophone),
                   homophone_errors=homophone[0], after_homophone_units=after_homophone[1])
    return out


@torch.no_grad()
def decode_split(model, tok, r2c, split, idx, batch=32):
    """Decoded units per utterance (characters and English words), and for a roman run the syllables
    the recogniser wrote before Roman2Char."""
    model.eval()
    out, syllables = [], []
    for k in range(0, len(idx), batch):
        wave, lengths = split.waves(idx[k:k + batch])
        feed = targets(tok, split, idx[k:k + batch], unknown=0) if oracle else None  # unknown: the blank
        units = transcribe(model, tok, None, wave, lengths, beam, feed)  # before Roman2Char
        syllables += units
        out += to_chars_batch(r2c, units) if r2c is not None else units
    model.train()
    return out, syllables


def evaluate(model, tok, r2c, data, name):
    """score() of data[name] ('val' or 'test') decoded, with the training counts and readings of data."""
    split = data[name]
    idx = list(range(len(split) if not eval_max else min(eval_max, len(split))))
    hyps, syllables = decode_split(model, tok, r2c, split, idx)
    result = score([split.units[i] for i in idx], hyps, data['seen'], data['readings'])
    if r2c is not None:  # the recogniser's own output, before Roman2Char: tonal syllables against the reference's
        refs = [[p if p else u for u, p in zip(split.units[i], split.pinyin[i])] for i in idx]
        result['mer_roman'] = score(refs, syllables)['mer']
    return result


# -----------------------------------------------------------------------------
# the joint's memory: peak resident memory of one forward and backward, in a fresh process

JOINT_PROBE = """
import sys, torch
sys.path.insert(0, {root!r})
from asr import joint_loss
def kib(key):
    return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith(key))
torch.manual_seed(0)
B, T, U, J, V, chunk = {B}, {T}, {U}, {J}, {V}, {chunk}
f = torch.randn(B, T, J, requires_grad=True); g = torch.randn(B, U + 1, J, requires_grad=True)
w = torch.randn(V, J, requires_grad=True); b = torch.zeros(V, requires_grad=True)
y = torch.randint(1, V, (B, U)); frames = torch.full((B,), T); labels = torch.full((B,), U)
base = kib('VmRSS:')
open('/proc/self/clear_refs', 'w').write('5')  # the peak (VmHWM) starts again from here
joint_loss(f, g, w, b, y, frames, labels, chunk).sum().backward()
print(kib('VmHWM:') - base)
"""


def joint_peak_mb(vocab, chunk, B, T, U, J):
    """MB above its inputs that one RNN-T forward and backward through the joint takes at its peak, in a
    fresh process (Linux's peak resident set, reset before the step), for a batch of B utterances of T
    frames and U labels: the whole (B, T, U + 1, V) logits (chunk 0), or the fused joint."""
    code = JOINT_PROBE.format(root=os.path.dirname(os.path.abspath(__file__)), B=B, T=T, U=U, J=J, V=vocab,
                              chunk=chunk)
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    if out.returncode:
        die(f'the joint memory probe failed: {out.stderr.strip()[-300:]}')
    return int(out.stdout.split()[-1]) / 1024


def joint_memory(tok, split):
    """The joint's peak MB, whole and fused, at a batch of the longest utterances (T frames, U labels),
    and the batch sizes that fit memory_budget_mb (the peak is linear in the batch)."""
    T = Subsampling.frames(int(np.diff(split.offsets).max()) // 160 + 1)  # log_mel's frames, then 8x fewer
    U = max(len(tok.encode(u, p)) for u, p in zip(split.units, split.pinyin))
    mb = [joint_peak_mb(tok.vocab_size, c, batch_size, T, U, joint_dim) for c in (0, joint_chunk or 4)]
    return {'T': T, 'U': U, 'B': batch_size, 'mb': mb,
            'batch_fits': [int(memory_budget_mb / (m / batch_size)) if m > 0 else None for m in mb]}


# -----------------------------------------------------------------------------
# one run

def output_tokens(tok):
    """Each output id's text: '' for the blank, then the English and the Mandarin range's pieces."""
    return [''] + [p.removeprefix(romanize.WORD_START) for p in tok.en.pieces + tok.zh.pieces]


def reader(sentences):
    """PET's pronunciation source: a token's tonal syllable, the token itself where it is one (roman
    pieces), else a character's most frequent reading in the training text, else None (English)."""
    readings, _ = count_readings(sentences)
    reading = {}
    for (syllable, char), _ in readings.most_common():
        reading.setdefault(char, syllable)
    return lambda token: token if romanize.is_syllable(token) else reading.get(token)


def lr_at(step):
    if step < warmup:
        return learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_run(name, data):
    mode, pet = name.split('+')[0], name.endswith('+pet')
    sentences = [{'units': u, 'pinyin': p} for u, p in zip(data['train'].units, data['train'].pinyin)]
    tok = build_tokenizer(sentences, mode, token_budget)
    r2c = None
    if mode == 'roman':
        if not os.path.exists(roman2char):
            die(f'{roman2char} not found: train Roman2Char first with python romanize.py')
        r2c = romanize.load(roman2char)
    features = token_features(output_tokens(tok), reader(sentences)) if pet else None
    cfg = ASRConfig(vocab_size=tok.vocab_size, pet=features.names if pet else (),
                    **{k: config[k] for k in asdict(ASRConfig()) if k not in ('vocab_size', 'pet')})
    torch.manual_seed(seed)
    model = Transducer(cfg, features)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay}, {'params': rest, 'weight_decay': 0}],
                            lr=learning_rate)
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    train, n_params = data['train'], sum(p.numel() for p in model.parameters())
    print(f'{name}: {tok.vocab_size} output tokens, {n_params / 1e6:.2f}M parameters')
    t0, pbar = time.time(), tqdm(range(steps), desc=name, dynamic_ncols=True)
    for step in pbar:
        idx = np.random.default_rng([seed, step]).choice(len(train), batch_size, replace=False)
        wave, lengths = train.waves(idx)
        y, labels = targets(tok, train, idx)
        for group in opt.param_groups:
            group['lr'] = lr_at(step)
        loss = model(wave, lengths, y, labels, chunk=joint_chunk or None).sum() / labels.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float('inf'))
        opt.step()
        row = {'step': step, 'loss': loss.item(), 'grad_norm': norm.item(), 'lr': lr_at(step)}
        if (eval_every and (step + 1) % eval_every == 0) or step == steps - 1:
            row['val'] = evaluate(model, tok, r2c, data, 'val')
            pbar.write(f"{name} step {step + 1}: loss {row['loss']:.3f}, val MER {row['val']['mer']:.3f}")
        append_log(folder, row, fresh=step == 0)  # a run starts its folder's log anew
        pbar.set_postfix(loss=f'{loss.item():.3f}')
    minutes = (time.time() - t0) / 60
    result = {'run': name, 'vocab_size': tok.vocab_size, 'params': n_params, 'minutes': minutes, 'val': row['val'],
              'test': evaluate(model, tok, r2c, data, 'test'), 'joint': joint_memory(tok, train)}
    torch.save({'model': model.state_dict(), 'config': asdict(cfg), 'tokenizer': tok.to_dict(),
                'features': asdict(features) if features else None, 'run': name,
                'roman2char': romanize.state(r2c) if r2c is not None else None},
               os.path.join(folder, 'ckpt.pt'))
    return result


def table(results):
    lines = ['| run | vocab | joint MB, whole / fused | batch in budget, whole / fused | val MER | test MER | '
             'test CER zh | test WER en | P(err) | P(err after err) | rare CER | P(err after rare) | '
             'P(err after a homophone) |', '|' + ' --- |' * 13]
    for r in results:
        t, j = r['test'], r.get('joint')  # a rescored run has no joint figures
        memory = f"{j['mb'][0]:.0f} / {j['mb'][1]:.0f} | {j['batch_fits'][0]} / {j['batch_fits'][1]}" if j else "- | -"
        lines.append(f"| {r['run']} | {r['vocab_size']} | {memory} | {r['val']['mer']:.3f} | {t['mer']:.3f} | "
                     f"{t['cer_zh']:.3f} | {t['wer_en']:.3f} | {t['p_error']:.3f} | {t['p_error_after_error']:.3f} | "
                     f"{t['cer_rare']:.3f} ({t['rare_units']}) | {t['p_error_after_rare']:.3f} | "
                     f"{t['p_error_after_homophone']:.3f} ({t['after_homophone_units']}) |")
    return '\n'.join(lines)


if __name__ == '__main__':
    names = runs.split(',')
    bad = [n for n in names if n not in RUN_KINDS]
    if bad:
        die(f'--runs: unknown run {bad[0]!r}; runs are {", ".join(RUN_KINDS)}', 2)
    done = [n for n in names if os.path.exists(os.path.join(out_dir, n, 'ckpt.pt'))]
    if oracle and (beam or not rescore):
        die('--oracle=True rescores finished runs greedily: pass --rescore=True and no --beam', 2)
    if rescore and len(done) < len(names):
        die(f'--rescore: {out_dir}/{[n for n in names if n not in done][0]} holds no finished run', 2)
    if done and not overwrite and not rescore:
        die(f'{out_dir}/{done[0]} holds a finished run: pass --overwrite=True to replace it, or another --out_dir', 2)
    if threads:
        torch.set_num_threads(threads)
    data = load_data(data_dir)
    results = []
    for name in names:
        if rescore:  # results.json keeps the training's own scores; these go beside it, by decoding
            model, tok, r2c = load_transducer(os.path.join(out_dir, name))
            results.append({'run': name, 'vocab_size': tok.vocab_size, 'beam': beam, 'oracle': oracle,
                            **{k: evaluate(model, tok, r2c, data, k) for k in ('val', 'test')}})
            with open(os.path.join(out_dir, name, 'rescore_oracle.json' if oracle else f'rescore_beam{beam}.json'),
                      'w') as f:
                json.dump(results[-1], f, indent=1)
            continue
        r = train_run(name, data)
        with open(os.path.join(out_dir, name, 'results.json'), 'w') as f:
            json.dump(r, f, indent=1)
        results.append(r)
    print(table(results))
