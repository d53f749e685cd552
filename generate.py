"""
generate.py: decoding with caches. Read after model.py.

- the caches, one small class per kind of state: KVCache (an attention layer's keys and values, a
  sliding-window layer's ring included), MambaCache (a Mamba layer's conv window and SSM state),
  and Star Attention's two per-host layouts, StarContextCache and StarQueryCache;
- sampling: probabilities (temperature, top-k, top-p), sample_next, and the speculative accept;
- generate_stream / generate: one prefill forward over the prompt, then one token at a time;
- speculative_stream: self-speculative decoding, the MTP depths drafting for the main model;
- star_prefill: Star Attention's two-phase prefill of a long prompt.
model.Nemotron.generate is the public entry point and calls generate() here. The mixers
(attention.py, mamba.py) read and write these caches' fields; this file makes them.
"""

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from attention import star_broadcast, star_rank

# -----------------------------------------------------------------------------
# caches


def held_positions(end, S, device):
    """The position slot s of S holds once positions 0 .. end-1 were written to slot position mod S:
    the latest p < end with p = s mod S, negative for a slot not written yet. end: an int or (B, 1)."""
    return end - 1 - (end - 1 - torch.arange(S, device=device)) % S


@dataclass
class KVCache:
    """One attention layer's keys and values, preallocated: appending writes in place. A global
    layer's cache has a slot per position (slot s holds position s); a sliding-window layer's
    (window W) is a ring of R = W + 8 slots, slot s holding the latest position = s mod R, in
    constant memory. The 8 spare slots let speculative decoding take back up to 8 new entries
    without losing a key still in the window."""
    star_phase: ClassVar[int] = 0  # attention.py: not Star Attention (1 and 2: the classes below)
    per_row: ClassVar[bool] = False  # attention.py: one position for all rows (StaticKVCache: one each)
    k: torch.Tensor                # (B, g, S, d)
    v: torch.Tensor                # (B, g, S, d)
    window: Optional[int] = None   # W of a sliding-window layer (a ring), None: global
    pos: int = 0                   # tokens appended so far: the position of the next one
    end: int = 0                   # 1 + the highest position ever written (> pos after a roll back)

    @classmethod
    def empty(cls, attn, batch_size, max_len, device, dtype):
        """An empty cache for attention module attn, for up to max_len tokens."""
        size = min(max_len, attn.window + 8) if attn.window else max_len
        shape = (batch_size, attn.n_kv_head, size, attn.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                   attn.window)

    def positions(self):
        """The position held in each of the S slots (S,); negative: an empty slot."""
        return held_positions(self.pos, self.k.size(2), self.k.device)

    def append(self, k, v):
        """Write the keys and values (B, g, T, d) of the next T positions. A ring keeps the newest
        R of them, overwriting the oldest entries."""
        T, R = k.size(2), self.k.size(2)
        if self.window is None:
            if self.pos + T > R:
                raise ValueError(f"KV cache holds {R} positions, asked for {self.pos + T}")
            self.k[:, :, self.pos:self.pos + T], self.v[:, :, self.pos:self.pos + T] = k, v
        else:
            keep = min(T, R)
            slots = torch.arange(self.pos + T - keep, self.pos + T, device=k.device) % R
            self.k[:, :, slots], self.v[:, :, slots] = k[:, :, T - keep:], v[:, :, T - keep:]
        self.pos += T
        self.end = max(self.end, self.pos)

    def truncate(self, pos):
        """Forget every entry from position pos on (speculative decoding's roll back). A ring can
        go back only while the window before pos is still held: past its spare slots, positions
        written later have overwritten it."""
        lowest = 0 if self.window is None else self.end - (self.k.size(2) - self.window)
        if not lowest <= pos <= self.pos:
            raise ValueError(f"cannot roll a cache at position {self.pos} back to {pos}")
        self.pos = pos

    def select(self, rows):
        """The cache of the batch rows `rows` (a list or tensor of row indices), a copy."""
        return KVCache(self.k[rows], self.v[rows], self.window, self.pos, self.end)


@dataclass
class MambaCache:
    """One Mamba-2 layer's decoding state, constant in size: the last K-1 inputs of the causal
    conv and the SSM state h (fp32). With keep_states set (speculative decoding), the mixer runs
    every forward token by token and keeps the state after each token in `history`, so that
    rollback() can return to any of them."""
    conv: torch.Tensor             # (B, conv_dim, K-1)
    ssm: torch.Tensor              # (B, H, P, N), fp32; the decode kernel updates it in place
    keep_states: bool = False
    history: Optional[tuple] = None  # (conv window (B, conv_dim, K-1+k), states (B, k, H, P, N)) of the last step
    lengths: Optional[torch.Tensor] = None  # (B,): a prefill of right-padded prompts, row b's ending at lengths[b]

    @classmethod
    def empty(cls, mixer, batch_size, device, dtype):
        """Zero states (the start of a sequence) for Mamba2Mixer mixer."""
        conv = torch.zeros(batch_size, mixer.conv_dim, mixer.K - 1, device=device, dtype=dtype)
        return cls(conv, torch.zeros(batch_size, mixer.H, mixer.P, mixer.N, device=device, dtype=torch.float32))

    def rollback(self, j):
        """Return to the state after the j-th (0-based) token of the last step."""
        if self.history is None:
            raise ValueError("nothing to roll back: set keep_states before the step")
        window, states = self.history
        self.history = None
        self.conv = window[:, :, j + 1:j + 1 + self.conv.size(2)].contiguous()  # the last K-1 inputs up to token j
        self.ssm = states[:, j].contiguous()

    def select(self, rows):
        """The states of the batch rows `rows` (a list or tensor of row indices), a copy."""
        return MambaCache(self.conv[rows].contiguous(), self.ssm[rows].contiguous(), self.keep_states)


@dataclass
class StarContextCache:
    """Star Attention's phase 1 (context encoding) for one attention layer, m blocks at once in
    R = m*B rows (block-major): every block sees the anchor's keys and, causally, its own. The
    block's keys and values are left in `new` for its host to keep; the anchor's go with this."""
    star_phase: ClassVar[int] = 1
    k: torch.Tensor                # (B, g, A, d): the anchor's keys
    v: torch.Tensor                # (B, g, A, d)
    kpos: torch.Tensor             # (A,): their global positions
    qpos: torch.Tensor             # (R, T): the global positions of each row's tokens
    new: Optional[tuple] = None    # (k, v) of the rows' tokens (R, g, T, d), written by the layer


@dataclass
class StarQueryCache:
    """Star Attention's phase 2 (query encoding and generation) for one attention layer: the
    context blocks this process holds, and on the query host a buffer for the query and the
    generated tokens. Every host attends over its keys; an exact log-sum-exp combine (attention.py)
    gives the softmax over all of them."""
    star_phase: ClassVar[int] = 2
    k: Optional[torch.Tensor]      # (B, n, g, L, d): n blocks held here, padded to L (None: no block here)
    v: Optional[torch.Tensor]      # (B, n, g, L, d)
    kpos: Optional[torch.Tensor]   # (n, L): the blocks' global positions, -1 for padding
    qk: Optional[torch.Tensor]     # (B, g, S, d): the query host's buffer (None on other hosts)
    qv: Optional[torch.Tensor]     # (B, g, S, d)
    pos: int                       # global position of the next token
    group: object = None           # the process group of the hosts (None: this process is all of them)
    fill: int = 0                  # entries in the buffer


def new_cache(model, batch_size, max_len):
    """One cache per layer of model: a MambaCache, a KVCache, or None (MLP and MoE keep nothing)."""
    p = model.lm_head.weight
    cache = []
    for block in model.backbone.layers:
        if block.kind == "M":
            cache.append(MambaCache.empty(block.mixer, batch_size, p.device, p.dtype))
        elif block.kind in "*W":
            cache.append(KVCache.empty(block.mixer, batch_size, max_len, p.device, p.dtype))
        else:
            cache.append(None)
    return cache


def rollback(cache, n_new, j):
    """Keep the first j+1 of the n_new positions the last forward appended to every layer's cache."""
    for c in cache:
        if isinstance(c, MambaCache):
            c.rollback(j)
        elif isinstance(c, KVCache):
            c.truncate(c.pos - (n_new - (j + 1)))


# -----------------------------------------------------------------------------
# sampling


def probabilities(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, vocab) -> the distribution sampling draws from (B, vocab): temperature, then
    top-k and top-p filtering. temperature=0 returns the logits untouched (greedy takes argmax)."""
    if temperature == 0:
        return logits
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)))[0][:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(-1)


def pick(probs, temperature):
    """A token (B, 1) from probabilities(): argmax when greedy, else a draw."""
    return probs.argmax(-1, keepdim=True) if temperature == 0 else torch.multinomial(probs, 1)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, vocab) -> next token (B, 1): greedy, or temperature / top-k / top-p sampling."""
    return pick(probabilities(logits, temperature, top_k, top_p), temperature)


def accept(drafts, q, p, temperature):
    """Speculative acceptance of k drafts. drafts (k,), q (k, vocab) the draft distributions they
    were drawn from, p (k+1, vocab) the verifier's at the same positions and one past them.
    Returns j, the number of drafts kept, and the verifier's own next token (a tensor).
    Greedy: keep drafts while they equal the verifier's argmax, then add its argmax.
    Sampling (Leviathan et al. 2023, Chen et al. 2023): keep d_i with probability
    min(1, p_i(d_i) / q_i(d_i)); at the first rejection draw from norm(max(p_i - q_i, 0)); if all
    are kept draw from p_k. The tokens emitted are then distributed exactly as p's own draws."""
    k = drafts.numel()
    if temperature == 0:
        target = p.argmax(-1)  # (k+1,)
        j = int((drafts == target[:k]).long().cumprod(0).sum())
        return j, target[j]
    for i in range(k):
        d = drafts[i]
        if torch.rand(()) * q[i, d] <= p[i, d]:  # accepted with probability min(1, p/q)
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        return i, torch.multinomial(residual / residual.sum(), 1)[0]
    return k, torch.multinomial(p[k], 1)[0]


# -----------------------------------------------------------------------------
# decoding


@torch.no_grad()
def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, steer=None,
                    star_block=None, star_query=1, star_group=None):
    """Yields max_new_tokens tokens of shape (B, 1): one prefill forward over the prompt idx (B, T)
    (the chunked SSD hands its final state to the cache), then one token at a time.
    steer(token (B, 1)) -> tokens (B, m >= 1) may replace each sampled token by others, which are
    emitted and read as if sampled (a thinking budget closes its section this way).
    star_block=b: Star Attention (star_prefill below) in blocks of b tokens, the last star_query
    prompt tokens as the query; star_group: the process group of the hosts (every rank then emits
    the tokens its rank 0 sampled). None / 0: ordinary full attention."""
    if star_block:
        cache, h = star_prefill(model, idx, star_block, star_query, max_new_tokens, star_group)
        logits = model.lm_head(h[:, -1]).float()  # (B, vocab)
    else:
        cache = new_cache(model, idx.size(0), idx.size(1) + max_new_tokens)
        logits = model.lm_head(model.hidden(idx, cache)[:, -1]).float()  # (B, vocab)
    emitted = 0
    while emitted < max_new_tokens:
        nxt = sample_next(logits, temperature, top_k, top_p)  # (B, 1)
        if star_block and star_group is not None:  # one token for all hosts, whatever their RNGs
            nxt = star_broadcast(nxt, 0, star_group)
        if steer is not None:
            nxt = steer(nxt)[:, :max_new_tokens - emitted]  # (B, m)
        for i in range(nxt.size(1)):
            yield nxt[:, i:i + 1]
        emitted += nxt.size(1)
        if emitted < max_new_tokens:
            logits = model.lm_head(model.hidden(nxt, cache)[:, -1]).float()


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, speculative=0,
             star_block=None, star_query=1, star_group=None, compile=False):
    """idx (B, T) -> (B, T + max_new_tokens); Nemotron.generate documents it."""
    if speculative and star_block:
        raise ValueError("speculative decoding and Star Attention do not combine: use one of them")
    if compile:
        if speculative or star_block:
            raise ValueError("compile=True decodes over static caches: not with speculative or star_block")
        done = generate_batch(model, idx.tolist(), max_new_tokens, temperature, top_k, top_p,
                              max_batch=idx.size(0), compile=True)
        return torch.cat([idx, torch.tensor([r.tokens for r in done], device=idx.device)], dim=1)
    if speculative:
        new = list(speculative_stream(model, idx, max_new_tokens, speculative, temperature, top_k, top_p))
    else:
        new = list(generate_stream(model, idx, max_new_tokens, temperature, top_k, top_p, None,
                                   star_block, star_query, star_group))
    return torch.cat([idx, *new], dim=1)


# -----------------------------------------------------------------------------
# batched decoding over static caches (gpt-fast's recipe): every buffer allocated once for
# (rows, max_len), a position per row, and a one-token step whose shapes never change, so that
# torch.compile compiles it once (CUDA graphs on a GPU) and nothing in it waits on the host.
# A prompt is prefilled on its own (batch 1, the ordinary caches above) and copied into a free
# row, so no padding ever enters an attention cache or a Mamba state; then all rows step together.


@dataclass
class StaticKVCache:
    """An attention layer's keys and values for batched decoding: S slots per row (max_len for a
    global layer, a ring of min(max_len, W + 8) for a W layer); slot s of row b holds the latest
    position p with p = s mod S among those row b has written. Rows sit at their own positions."""
    star_phase: ClassVar[int] = 0
    per_row: ClassVar[bool] = True  # attention.py: Attention.rows
    k: torch.Tensor                # (B, g, S, d)
    v: torch.Tensor                # (B, g, S, d)
    pos: torch.Tensor              # (B,) int64: each row's next position (StaticCache.pos, shared)

    def write(self, k, v, qpos):
        """The keys and values (B, g, T, d) of positions qpos (B, T), into their slots in place."""
        rows = torch.arange(k.size(0), device=k.device)[:, None]  # (B, 1)
        slots = qpos % self.k.size(2)  # (B, T)
        self.k[rows, :, slots] = k.transpose(1, 2)  # (B, T, g, d) in the indexed layout
        self.v[rows, :, slots] = v.transpose(1, 2)

    def positions(self, end):
        """The position each slot holds (B, S), row b having written the positions below end[b]
        (end: (B, 1)); negative: an empty slot."""
        return held_positions(end, self.k.size(2), self.k.device)


@dataclass
class StaticCache:
    """All layers' decoding state for `rows` sequences of up to max_len tokens: a StaticKVCache
    per attention layer, a MambaCache per Mamba layer (constant in size already, updated in
    place), None for MLP and MoE layers, and one position per row that the KV caches share."""
    layers: list
    pos: torch.Tensor              # (B,) int64
    max_len: int

    @classmethod
    def empty(cls, model, rows, max_len):
        p = model.lm_head.weight
        pos = torch.zeros(rows, dtype=torch.long, device=p.device)
        layers = []
        for block in model.backbone.layers:
            if block.kind == "M":
                layers.append(MambaCache.empty(block.mixer, rows, p.device, p.dtype))
            elif block.kind in "*W":
                a = block.mixer
                S = min(max_len, a.window + 8) if a.window else max_len
                kv = [torch.zeros(rows, a.n_kv_head, S, a.head_dim, device=p.device, dtype=p.dtype) for _ in "kv"]
                layers.append(StaticKVCache(*kv, pos))
            else:
                layers.append(None)
        return cls(layers, pos, max_len)

    def first(self, n):
        """The same state for rows 0 .. n-1 only: views, so that a step over them writes here."""
        pos = self.pos[:n]  # one view for all layers: a compiled step must not see aliases of what it mutates
        layers = [StaticKVCache(c.k[:n], c.v[:n], pos) if isinstance(c, StaticKVCache) else
                  MambaCache(c.conv[:n], c.ssm[:n]) if isinstance(c, MambaCache) else None for c in self.layers]
        return StaticCache(layers, pos, self.max_len)

    def fill_row(self, b, cache, n, i=0):
        """Row b takes over row i of a prefill's cache (new_cache's), whose prompt had n tokens (the
        prefill's positions from n on, if any, were padding)."""
        for mine, theirs in zip(self.layers, cache):
            if isinstance(mine, MambaCache):
                mine.conv[b], mine.ssm[b] = theirs.conv[i], theirs.ssm[i]
            elif isinstance(mine, StaticKVCache):
                S = mine.k.size(2)  # the newest min(n, S) positions below n, each to slot position mod S
                held = theirs.positions()  # (R,): the position in each of the prefill's slots
                keep = (held >= n - S) & (held >= 0) & (held < n)
                slots = held[keep] % S
                mine.k[b][:, slots], mine.v[b][:, slots] = theirs.k[i][:, keep], theirs.v[i][:, keep]  # (g, ., d)
        self.pos[b] = n


def decode_step(model, cache, tokens, advance):
    """One token for every row of a StaticCache: tokens (B, 1) at positions cache.pos -> logits
    (B, vocab) and their argmax (B,), the greedy rows' tokens; each row's position then moves by
    advance (B,) (1, or 0 for a row not decoding: it computes, and keeps writing the same slot)."""
    logits = model.lm_head(model.hidden(tokens, cache.layers)[:, -1]).float()  # (B, vocab)
    cache.pos.add_(advance)
    return logits, logits.argmax(-1)


# inductor's options for the step on a CPU: its C++ wrapper calls the graph's kernels from C++, not a
# line of Python each (bench.py decode times the step with and without it)
CPU_COMPILE = {"cpp_wrapper": True}


def step_function(model, rows, max_len, compile):
    """decode_step, or its compiled form for this (rows, max_len) bucket, compiled on first use
    and kept on the model: torch.compile(fullgraph=True), with CUDA graphs on a GPU and the
    CPU_COMPILE options on a CPU."""
    if not compile:
        return decode_step
    steps = model.__dict__.setdefault("_decode_steps", {})
    cuda = model.lm_head.weight.is_cuda
    key = (rows, max_len, () if cuda else tuple(sorted(CPU_COMPILE.items())))
    if key not in steps:
        how = dict(mode="reduce-overhead") if cuda else dict(options=dict(CPU_COMPILE))
        steps[key] = torch.compile(decode_step, fullgraph=True, dynamic=False, **how)
    return steps[key]


@dataclass
class Request:
    """One sequence to decode: its prompt, its own limits and sampling settings, and what it got.
    stop: token ids that end it (not emitted). finish: None while decoding, then why it ended."""
    prompt: list
    max_new_tokens: int
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: tuple = ()
    tokens: list = field(default_factory=list)
    finish: Optional[str] = None   # "stop", "length", or "error" (then error says why)
    error: Optional[str] = None
    generator: Optional[torch.Generator] = None

    def take(self, token):
        """Record a sampled token; True when this request is done."""
        if token in self.stop:
            self.finish = "stop"
        else:
            self.tokens.append(token)
            if len(self.tokens) >= self.max_new_tokens:
                self.finish = "length"
        return self.finish is not None


def sample_row(logits, r):
    """A token (int) for request r from its logits (vocab,), with r's settings and generator."""
    probs = probabilities(logits[None], r.temperature, r.top_k, r.top_p)  # (1, vocab)
    if r.temperature == 0:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=r.generator))


class Engine:
    """Continuous batching over one StaticCache of `rows` rows: add() prefills a request into the
    lowest free row (its first token comes from the prefill), step() decodes one token for the
    busy rows; a row whose request ends is free at once for the next. A step runs the first n rows,
    n the power of two (or `rows`) that covers the highest busy one: one request alone does not pay
    for a full batch, and the compiled step has one graph per n. generate_batch and serve.py drive it."""

    def __init__(self, model, rows, max_len, compile=False):
        self.model, self.max_len, self.compile = model, max_len, compile
        self.cache = StaticCache.empty(model, rows, max_len)
        device = model.lm_head.weight.device
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)  # (B, 1): each row's next input
        self.advance = torch.zeros(rows, dtype=torch.long, device=device)  # (B,): 1 for a busy row
        self.requests = [None] * rows
        self.views = {}  # n -> first(n)

    def free_rows(self):
        return [b for b, r in enumerate(self.requests) if r is None]

    @torch.no_grad()
    def warm_up(self):
        """Run (and so compile) the step of every row count it may use, before any request: free rows
        only, their positions unchanged (a prefill overwrites what they wrote)."""
        n, rows = 1, len(self.requests)
        while True:
            n = min(n, rows)
            step_function(self.model, n, self.max_len, self.compile)(self.model, *self.first(n))
            if n == rows:
                return
            n *= 2

    def first(self, n):
        """(the first n rows' cache, tokens, advance), made once: a compiled step meets the same inputs again."""
        if n not in self.views:
            self.views[n] = self.cache.first(n), self.tokens[:n], self.advance[:n]
        return self.views[n]

    def add(self, r):
        """Prefill request r into a free row; False if none is free. Its first token is taken."""
        return self.add_many([r]) == 1

    @torch.no_grad()
    def add_many(self, requests):
        """Prefill as many of requests, in order, as there are free rows, together: one forward over
        their prompts right-padded to the longest (a Mamba layer holds its state through the padding,
        attention never reads it: causal). Returns how many were taken; each one's first token is."""
        take = list(zip(self.free_rows(), requests))
        for _, r in take:  # every one checked before any work
            if not r.prompt or len(r.prompt) + r.max_new_tokens > self.max_len:
                raise ValueError(f"a prompt of {len(r.prompt)} tokens and {r.max_new_tokens} new ones do not fit "
                                 f"in {self.max_len} positions (and a prompt needs a token)")
        device = self.tokens.device
        for _, r in take:
            if r.generator is None and r.temperature > 0:
                r.generator = torch.Generator(device=device)
                r.generator.manual_seed(r.seed if r.seed is not None else int(torch.randint(2**62, ())))
        # a sliding-window layer's prefill ring (W + 8 slots) would drop a shorter prompt's keys under
        # the padding: past that length, a prompt is prefilled alone
        ring = min((m.window + 8 for m in self.model.modules() if getattr(m, "window", None)), default=None)
        # the padding costs compute (a prefill is compute-bound on a CPU past ~100 tokens: `bench.py batch`
        # times 16 prompts of 64-512 tokens at 480 ms one by one, 672 ms padded together, 449 ms as one
        # packed sequence): prompts of similar length go together, at most 1/8 of a batch's tokens padding
        batches = []
        for b, r in sorted(take, key=lambda t: len(t[1].prompt)):
            n, last = len(r.prompt), batches[-1] if batches else None
            fits = last is not None and (len(last) + 1) * n <= 1.125 * (sum(len(q.prompt) for _, q in last) + n)
            if fits and (ring is None or n <= ring):
                last.append((b, r))
            else:
                batches.append([(b, r)])
        for batch in batches:
            self.prefill(batch)
        return len(take)

    def prefill(self, batch):
        """The prompts of batch [(row, request)] in one forward, into their rows; their first tokens."""
        lengths = [len(r.prompt) for _, r in batch]
        T, device = max(lengths), self.tokens.device
        idx = torch.tensor([r.prompt + [0] * (T - len(r.prompt)) for _, r in batch], device=device)  # (k, T)
        cache = new_cache(self.model, len(batch), T)
        if min(lengths) < T:  # padding in some rows: each Mamba layer keeps each row's state at its end
            n = torch.tensor(lengths, device=device)
            cache = [MambaCache(c.conv, c.ssm, lengths=n) if isinstance(c, MambaCache) else c for c in cache]
        h = self.model.hidden(idx, cache)  # (k, T, d)
        last = h[torch.arange(len(batch), device=device), torch.tensor(lengths, device=device) - 1]  # (k, d)
        logits = self.model.lm_head(last).float()  # (k, vocab)
        for i, ((b, r), n) in enumerate(zip(batch, lengths)):
            self.cache.fill_row(b, cache, n, i)
            token = sample_row(logits[i], r)
            if not r.take(token):
                self.requests[b] = r
                self.tokens[b, 0], self.advance[b] = token, 1

    @torch.no_grad()
    def step(self):
        """One token for every busy row. Returns the requests that finished."""
        busy = [b for b, r in enumerate(self.requests) if r is not None]
        if not busy:
            return []
        n = min(len(self.requests), 1 << busy[-1].bit_length())  # a power of two > the highest busy row
        logits, greedy = step_function(self.model, n, self.max_len, self.compile)(self.model, *self.first(n))
        tokens = greedy.tolist()  # (n,): each row's argmax, read in one go; a sampling row's is replaced
        done = []
        for b in busy:
            r = self.requests[b]
            try:
                token = tokens[b] if r.temperature == 0 else sample_row(logits[b], r)
            except RuntimeError as e:  # this row cannot be sampled (NaN logits): it ends, the others go on
                r.finish, r.error, token = "error", str(e), None
            if token is None or r.take(token):
                self.free(b)
                done.append(r)
            else:
                tokens[b] = token
        self.tokens[:n, 0] = torch.tensor(tokens, device=self.tokens.device)  # a free row's is never read
        return done

    def release(self, r):
        """Drop request r from its row (a client gone), unfinished."""
        for b, mine in enumerate(self.requests):
            if mine is r:
                self.free(b)

    def free(self, b):
        """Row b takes no more steps (its position stays) and waits for the next request."""
        self.requests[b] = None
        self.advance[b] = 0


@torch.no_grad()
def engine_stream(model, ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, compile=False):
    """Yields the new tokens (1, 1) of one prompt (a token list) decoded by a one-row Engine:
    static caches, the step compiled with compile=True (sample.py --compile)."""
    r = Request(list(ids), max_new_tokens, temperature, top_k, top_p, seed=int(torch.randint(2**62, ())))
    engine = Engine(model, 1, length_bucket(len(r.prompt) + max_new_tokens), compile)
    engine.add(r)
    sent = 0
    while True:
        for t in r.tokens[sent:]:
            yield torch.tensor([[t]], device=engine.tokens.device)
        sent = len(r.tokens)
        if r.finish:
            return
        engine.step()


def length_bucket(n, step=64):
    """Static caches come in lengths that are multiples of step, so a compiled step is reused."""
    return -(-n // step) * step


@torch.no_grad()
def generate_batch(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
                   stop=(), max_batch=16, compile=False, lengths=None):
    """Decode many prompts of different lengths together. prompts: a list of token lists (or 1-D
    tensors), or a padded tensor (B, T) with lengths (B,), row b's prompt being its first lengths[b]
    tokens (the padding is never read). Every other setting is one value for all rows or a list
    with one per row (stop: a tuple of token ids, or a list of tuples). Returns the requests
    (generate.Request) in order: .tokens the new tokens (a stop token ends a row and is not among
    them), .finish why it ended. At most max_batch rows decode at once; the others wait for a row."""
    if lengths is not None:
        prompts = [row[:int(n)] for row, n in zip(prompts.tolist(), lengths)]
    n = len(prompts)
    # a list: one value per row; anything else (stop: a tuple) the same for every row
    settings = [v if isinstance(v, list) else [v] * n for v in (max_new_tokens, temperature, top_k, top_p, seed, stop)]
    if any(len(v) != n for v in settings):
        raise ValueError(f"per-row settings need one value per prompt ({n})")
    requests = [Request([int(t) for t in p], *vals) for p, *vals in zip(prompts, *settings)]
    if not requests:
        return []
    longest = max(len(r.prompt) + r.max_new_tokens for r in requests)
    engine = Engine(model, min(max_batch, n), length_bucket(longest), compile)
    waiting = list(requests)
    while waiting or any(r is not None for r in engine.requests):
        taken = engine.add_many(waiting)  # as many as there are free rows, prefilled together
        waiting = waiting[taken:]
        engine.step()
    return requests


# -----------------------------------------------------------------------------
# self-speculative decoding with the MTP depths
#
# Committed: the tokens t_0 .. t_n, the main model's caches through position n-1 (t_n is the
# next input), and its final hidden states h_i. One round:
#   1) draft: depth j = 1..k reads (h^{j-1}_i, t_{i+j}) at each position i of a short window
#      [s, n-1] and its output at n-1 proposes d_j for t_{n+j} (t_{n+j} itself for i+j > n is a
#      draft: d_{i+j-n}). Recomputing the window keeps each depth's attention cache exactly
#      what training saw: entries before s read committed tokens only (drafts that were since
#      accepted included), and are kept; s trails n by at most k-1, by less when drafts were kept.
#   2) verify: the main model reads [t_n, d_1 .. d_k] in one forward (k+1 positions); its
#      logits at position n+j-1 judge d_j, and the one after the last accepted draft gives a
#      token of its own, so a round emits 1 .. k+1 tokens.
#   3) roll back to the last accepted position: attention caches just forget the entries past
#      it; a Mamba layer cannot un-apply its recurrence, so in this forward it runs token by
#      token and keeps the conv window and the SSM state after every token (the k-token decode
#      kernel's saved states on a GPU, ssd_step on a CPU), and takes back the one it needs.


def mtp_cache(model, max_len):
    """Per MTP block: a KVCache, or None (MLP and MoE keep nothing)."""
    p = model.lm_head.weight
    return [KVCache.empty(b.mixer, 1, max_len, p.device, p.dtype) if b.kind == "*" else None
            for b in model.mtp[0].layers]


@torch.no_grad()
def speculative_stream(model, idx, max_new_tokens, k, temperature=1.0, top_k=None, top_p=None, stats=None):
    """Yields max_new_tokens tokens (1, 1) as generate_stream does, drafting k tokens per round
    with the MTP depths. stats, a dict, receives "rounds", "drafted" and "accepted" per draft
    position (for the acceptance rate)."""
    cfg = model.config
    if idx.size(0) != 1:
        raise ValueError("speculative decoding runs one sequence at a time (batch 1)")
    if not cfg.mtp_depth:
        raise ValueError("speculative decoding drafts with the MTP depths: this model has none (mtp_depth=0)")
    if not 1 <= k <= (7 if cfg.mtp_share else min(7, cfg.mtp_depth)):
        raise ValueError(f"speculative={k}: 1 .. {7 if cfg.mtp_share else min(7, cfg.mtp_depth)} "
                         f"draft tokens (one per MTP depth unless mtp_share; at most 7)")
    stats = stats if stats is not None else {}
    stats.update(rounds=0, drafted=0, accepted=[0] * k)
    max_len = idx.size(1) + max_new_tokens + k + 1
    cache = new_cache(model, 1, max_len)
    mtp_caches = [mtp_cache(model, max_len) for _ in range(k)]
    embed, head = model.backbone.embeddings, model.lm_head
    H = model.hidden(idx, cache)  # (1, n, d): main hidden states of the window [s, n-1]
    for c in cache:
        if isinstance(c, MambaCache):
            c.keep_states = True  # from now on, Mamba layers keep every state of a forward
    seq = torch.cat([idx, sample_next(head(H[:, -1]).float(), temperature, top_k, top_p)], dim=1)
    yield seq[:, -1:]
    # depths without attention (mtp_pattern of - and E only) act per position and keep no cache:
    # the window is then the last position alone
    per_position = "*" not in cfg.mtp_pattern
    emitted, s = 1, idx.size(1) - 1 if per_position else 0
    H = H[:, s:]
    while emitted < max_new_tokens:
        n = seq.size(1) - 1
        # 1) draft d_1 .. d_k, depth by depth over the window [s, n-1]
        h, ext, q = H, seq, []
        for j in range(1, k + 1):
            for c in mtp_caches[j - 1]:
                if c is not None:
                    c.truncate(s)  # entries from s on are recomputed
            h = model.mtp_depth_module(j)(h, embed(ext[:, s + j:n + j]), mtp_caches[j - 1])  # (1, n-s, d)
            q.append(probabilities(head(h[:, -1]).float(), temperature, top_k, top_p))  # (1, vocab)
            ext = torch.cat([ext, pick(q[-1], temperature)], dim=1)
        drafts = ext[:, n + 1:]  # (1, k)
        # 2) verify: the main model over [t_n, d_1 .. d_k]
        hv = model.hidden(ext[:, n:], cache)  # (1, k+1, d)
        p = probabilities(head(hv[0]).float(), temperature, top_k, top_p)  # (k+1, vocab)
        j, nxt = accept(drafts[0], torch.cat(q), p, temperature)  # drafts kept, the verifier's token
        # 3) roll back to position n+j, the last accepted draft
        rollback(cache, k + 1, j)
        stats["rounds"] += 1
        stats["drafted"] += k
        for i in range(j):
            stats["accepted"][i] += 1
        new = torch.cat([drafts[:, :j], nxt.view(1, 1)], dim=1)  # (1, j+1)
        for i in range(min(j + 1, max_new_tokens - emitted)):
            yield new[:, i:i + 1]
        emitted += j + 1
        seq = torch.cat([seq, new], dim=1)
        H = torch.cat([H, hv[:, :j + 1]], dim=1)
        # depth i's entry at position p read the tokens through t_{p+i}: drafts past t_n, which
        # are all committed now if p + i <= n + j. Every depth keeps its entries before s_next
        s_next = n + j if per_position else max(0, n - max(0, k - 1 - j))
        H, s = H[:, s_next - s:], s_next


# -----------------------------------------------------------------------------
# Star Attention (Acharya et al. 2024, arXiv:2411.17116): a long prompt prefilled in blocks.
#
# The prompt idx (B, T) is a context, its first Tc = T - query_len tokens, then a query, the last
# query_len (our choice of split: the caller says where the question starts; sample.py's default is
# the last token). The context is cut into n = ceil(Tc / b) blocks c_0 .. c_{n-1} of b tokens (the
# last one may be shorter), block i on host i. One process simulates all hosts; under a process
# group of K ranks, rank r holds the blocks i with i * K // n == r (contiguous), so the rank with the
# last block, the query host, is the last one that has any.
#   1) context encoding: the anchor c_0 alone; every later block c_i with the anchor prepended,
#      [c_0, c_i], at the global positions of both (RoPE and W windows, swan_scale); then the
#      anchor's keys/values are dropped, and each host keeps only those of its own block. The
#      anchor's hidden states are the same in front of every block (causal), so a process runs the
#      anchor once, and its other blocks as one batch of rows over the anchor's cache.
#   2) query encoding and generation: the query tokens, then each generated token, attend to all
#      cached keys: each host computes its local (out, lse), the exact global softmax combines them
#      (attention.py), and the query host appends their keys/values.
# Mamba layers (ours: the paper's models have none). In phase 1 a block's Mamba layers start from
# the state after the anchor, which the anchor-prepended sequence gives, so each block sees the
# anchor and itself through Mamba as through attention, and the blocks stay independent. Phase 2
# carries on from the last block's final states (the anchor, then the last block): the query host
# has them and broadcasts them once (constant size), so every host computes the same hidden states.
# What the middle blocks say reaches the query through the attention layers' keys only, never
# through a Mamba state: that is the hybrid's extra approximation (LOG.md measures it).
# MLP and MoE layers act per token, as always. W (sliding-window) layers keep their blocks' keys and
# go through the same combine with the window mask: in phase 2 only the last `window` positions are
# in view (of the last block, and of the one before when the last is shorter); in phase 1 a block's
# first tokens lose the keys of the block before (the anchor is usually out of the window).


def star_blocks(model, idx, starts, length, anchor):
    """Phase 1 for the blocks of `length` tokens at positions starts, one batch over the anchor's
    cache. Returns the hidden states (m, B, length, d) and the batch's cache (each attention
    layer's block keys in `new`, each Mamba layer's final states per row)."""
    B, m = idx.size(0), len(starts)
    x = torch.cat([idx[:, s:s + length] for s in starts])  # (m*B, length), block-major
    qpos = torch.tensor(starts, device=idx.device)[:, None] + torch.arange(length, device=idx.device)  # (m, length)
    rows = torch.arange(B, device=idx.device).repeat(m)  # (m*B,): row r of the batch is anchor row r % B
    cache = []
    for c in anchor:
        if isinstance(c, MambaCache):  # every block starts from the state after the anchor
            cache.append(c.select(rows))
        elif isinstance(c, KVCache):
            cache.append(StarContextCache(c.k, c.v, c.positions(), qpos.repeat_interleave(B, dim=0)))  # (m*B, length)
        else:
            cache.append(None)
    h = model.hidden(x, cache)  # (m*B, length, d)
    return h.view(m, B, length, -1), cache


@torch.no_grad()
def star_prefill(model, idx, block, query_len=1, max_new_tokens=0, group=None, mamba="anchor"):
    """Star Attention's prefill of idx (B, T): phase 1 over the context idx[:, :T - query_len] in
    blocks of `block` tokens, phase 2 over the query idx[:, T - query_len:]. group: a
    torch.distributed process group whose ranks are the hosts (every rank passes the same idx),
    None: this process simulates all of them. Returns (cache, h): the decoding cache, with which
    model.hidden(tokens, cache) runs phase 2 for up to max_new_tokens more tokens, and the final
    hidden states h (B, T, d) of the query (phase 2) and of the context blocks this process holds
    (phase 1; zero where another rank's blocks are). mamba="anchor": each block's Mamba layers
    start from the state after the anchor (the default, see above); "chain": from the state the
    block before ended in, which is exact for the Mamba recurrence but runs the blocks one after
    the other (one process only: an experiment to measure what "anchor" costs)."""
    B, T = idx.shape
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"star_block={block!r}: a block size in tokens >= 1")
    if isinstance(query_len, bool) or not isinstance(query_len, int) or not 1 <= query_len <= T:
        raise ValueError(f"star_query={query_len!r}: the query is 1 .. {T} tokens (the prompt's last ones)")
    if mamba not in ("anchor", "chain") or (mamba == "chain" and group is not None):
        raise ValueError(f"mamba={mamba!r}: 'anchor', or 'chain' in one process (no group)")
    Tc = T - query_len
    n = -(-Tc // block)
    rank, K = star_rank(group)
    mine = [i for i in range(n) if i * K // n == rank]
    query_host = (n - 1) * K // n if n else K - 1
    layers = model.backbone.layers
    h = torch.zeros(B, T, model.config.d_model, device=idx.device, dtype=model.lm_head.weight.dtype)
    held = [[] for _ in layers]  # per attention layer: (k, v, kpos) of each block held here
    last = new_cache(model, B, 1)  # Mamba states after the last block (zero with no context)
    # 1) context encoding
    if mine:
        A = min(block, Tc)
        anchor = new_cache(model, B, A)
        h[:, :A] = model.hidden(idx[:, :A], anchor)
        if mine[0] == 0:  # host 0 keeps the anchor's keys as its block's
            for i, c in enumerate(anchor):
                if isinstance(c, KVCache):
                    held[i].append((c.k, c.v, c.positions()))
            last = anchor
        rest = [i for i in mine if i > 0]
        full = [i * block for i in rest if (i + 1) * block <= Tc]  # starts of the full blocks
        short = [(i * block, Tc - i * block) for i in rest if (i + 1) * block > Tc]  # the shorter last one
        groups = ([(full, block)] if full else []) + [([s], L) for s, L in short]
        if mamba == "chain":  # one block at a time, each from the states the one before ended in
            groups = [([s], length) for starts, length in groups for s in starts]
        start_from = anchor
        for starts, length in groups:
            hb, cb = star_blocks(model, idx, starts, length, start_from)
            if mamba == "chain":
                start_from = [c if isinstance(c, MambaCache) else a for c, a in zip(cb, anchor)]
            for j, s in enumerate(starts):
                h[:, s:s + length] = hb[j]
            for i, c in enumerate(cb):
                if isinstance(c, StarContextCache):
                    k, v = (t.view(len(starts), B, *t.shape[1:]) for t in c.new)  # (m, B, g, length, d)
                    held[i] += [(k[j], v[j], c.qpos[j * B]) for j in range(len(starts))]
            if starts[-1] + length == Tc:  # the last block (the batch's last rows): its Mamba states carry on
                tail = torch.arange((len(starts) - 1) * B, len(starts) * B, device=idx.device)
                last = [c.select(tail) if isinstance(c, MambaCache) else None for c in cb]
    # 2) query encoding: the caches of phase 2, then the query through them
    cache = star_cache(model, held, last, B, Tc, query_len + max_new_tokens, query_host, group)
    h[:, Tc:] = model.hidden(idx[:, Tc:], cache)
    return cache, h


def star_cache(model, held, last, B, Tc, room, query_host, group):
    """Phase 2's cache: per attention layer the blocks held here, padded to one length (position
    -1: no key), one host each, and on the query host a buffer of `room` new tokens; per Mamba
    layer the states after the last block (the query host's, broadcast to all hosts)."""
    rank, _ = star_rank(group)
    p = model.lm_head.weight
    cache = []
    for i, b in enumerate(model.backbone.layers):
        if b.kind == "M":
            c = MambaCache(last[i].conv.contiguous(), last[i].ssm.contiguous())
            if group is not None:
                star_broadcast(c.conv, query_host, group)
                star_broadcast(c.ssm, query_host, group)
            cache.append(c)
        elif b.kind in "*W":
            k = v = kpos = qk = qv = None
            if held[i]:
                L = max(hk.size(2) for hk, _, _ in held[i])
                pad = lambda t: F.pad(t, (0, 0, 0, L - t.size(2)))  # (B, g, L, d)
                k = torch.stack([pad(hk) for hk, _, _ in held[i]], dim=1)  # (B, n, g, L, d)
                v = torch.stack([pad(hv) for _, hv, _ in held[i]], dim=1)  # (B, n, g, L, d)
                kpos = torch.stack([F.pad(hp, (0, L - hp.numel()), value=-1) for _, _, hp in held[i]])  # (n, L)
            if rank == query_host:
                shape = (B, b.mixer.n_kv_head, room, b.mixer.head_dim)
                qk = torch.zeros(shape, device=p.device, dtype=p.dtype)  # (B, g, room, d)
                qv = torch.zeros_like(qk)
            cache.append(StarQueryCache(k, v, kpos, qk, qv, Tc, group))
        else:
            cache.append(None)
    return cache
