"""Speculative decoding with an EAGLE draft: draft → verify → accept, batch size 1.

Notation: p is the target's distribution, q the draft's. Committed tokens are x_0..x_n; the target
cache holds positions 0..n-1 and the last token x_n (the "root") is not cached yet. The draft's row
t reads the token x_{t+1} and the target feature f_t and predicts x_{t+2}, so the draft cache also
holds n rows. One step:

1. draft a tree below x_n (`tree.grow_tree`; a chain is a tree with one child per node);
2. verify: one target forward over [x_n, nodes] under the tree mask, filling n+1+N cache entries;
3. accept a root→node path (greedy: the nodes that equal the target's argmax; sampling: the rule
   below), then the bonus token from the target's distribution at the last accepted row;
4. keep only the accepted path in the target cache and drop the draft's tree rows, then run the
   draft over the new rows with the target's own features (this also gives the next root row).

Sampling is lossless with deterministic (top-k) drafts: at a row with target distribution p, try
the children x in order and accept x with probability p(x); on reject set p(x) = 0 and
renormalise; when no child is accepted, sample the bonus token from the adjusted p. Every emitted
token is then distributed exactly as plain sampling from p.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer

from baldeagle.conventions import check_full_attention
from baldeagle.decode.tree import Tree, accept_greedy, compact_target_cache, grow_tree
from baldeagle.model.layers import DraftCache


@dataclass
class SpecSettings:
    mode: str = "tree"  # "chain" or "tree"
    num_draft_tokens: int = 4  # chain: k
    tree_depth: int = 5
    tree_topk: int = 4
    tree_total_tokens: int = 24  # root included
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.mode not in ("chain", "tree"):
            raise ValueError(f"mode must be 'chain' or 'tree', got {self.mode!r}")
        for name in ("num_draft_tokens", "tree_depth", "tree_topk", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.tree_total_tokens < 2:
            raise ValueError(f"tree_total_tokens must be at least 2 (root + one node), got {self.tree_total_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.eos_token_ids = tuple(int(t) for t in self.eos_token_ids)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(depth, topk, total_tokens) of the drafted tree."""
        if self.mode == "chain":
            return self.num_draft_tokens, 1, self.num_draft_tokens + 1
        return self.tree_depth, self.tree_topk, self.tree_total_tokens


@dataclass
class Generation:
    tokens: list[int]  # new tokens, EOS included when it ended the answer
    accepted: list[int] = field(default_factory=list)  # draft tokens accepted per verification step
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.accepted)


# ------------------------------------------------------------------------------------------
# Target side: KV cache and forward
# ------------------------------------------------------------------------------------------


class BufferLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are prefix views of a buffer that doubles when full.

    Appending writes in place instead of `torch.cat`-ing the whole cache on every forward;
    `crop` and `compact_target_cache` only re-slice `keys`/`values`, which stay prefix views.
    """

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._kbuf = self._vbuf = None
        length = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        need = length + key_states.shape[-2]
        if self._kbuf is None or need > self._kbuf.shape[-2]:
            shape = (*key_states.shape[:2], max(2 * need, 256), key_states.shape[-1])
            kbuf, vbuf = key_states.new_empty(shape), value_states.new_empty(shape)
            if length:
                kbuf[:, :, :length], vbuf[:, :, :length] = self.keys, self.values
            self._kbuf, self._vbuf = kbuf, vbuf
        self._kbuf[:, :, length:need] = key_states
        self._vbuf[:, :, length:need] = value_states
        self.keys, self.values = self._kbuf[:, :, :need], self._vbuf[:, :, :need]
        return self.keys, self.values


def new_target_cache(target) -> Cache:
    """A cache for full-attention targets (sliding-window or linear-attention layers are refused)."""
    check_full_attention(target.config, f"the target {getattr(target.config, '_name_or_path', '') or ''}".rstrip())
    return Cache(layers=[BufferLayer() for _ in range(target.config.get_text_config().num_hidden_layers)])


def target_forward(target, input_ids, position_ids, cache, attention_mask=None, aux_layer_ids=None, last_only=False):
    """One cached target forward. input_ids/position_ids [1, T] → (logits [T|1, V], features [1, T, F] or None).

    features = the hidden states `aux_layer_ids` (Transformers `hidden_states[i]`), concatenated.
    """
    out = target(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        cache=cache,
        use_cache=True,
        output_hidden_states=aux_layer_ids is not None,
        logits_to_keep=1 if last_only else 0,
    )
    features = None
    if aux_layer_ids is not None:
        features = torch.cat([out.hidden_states[i] for i in aux_layer_ids], dim=-1)
    return out.logits[0], features


def target_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """p: the target's sampling distribution [..., V] (float32) after temperature and nucleus filtering."""
    p = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = p.sort(dim=-1, descending=True)
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p  # mass before a token already reaches top_p
        p = p.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        p = p / p.sum(dim=-1, keepdim=True)
    return p


def choose(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> int:
    """The next token from one row of logits [V]: argmax, or a sample from p."""
    if temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(target_probs(logits, temperature, top_p).cpu(), 1, generator=generator))


def accept_sampling(tree: Tree, logits: torch.Tensor, temperature: float, top_p: float, generator=None):
    """Lossless acceptance with a deterministic draft. logits [N+1, V] → (path rows [m+1], bonus token)."""
    row, path = 0, [0]
    while True:
        p = target_probs(logits[row], temperature, top_p).cpu()  # [V] (sampled with a CPU generator)
        for child in tree.children(row):
            x = int(tree.tokens[child - 1])
            # q is one-hot on x, so min(1, p(x)/q(x)) = p(x) (p renormalised after earlier rejections)
            if float(torch.rand((), generator=generator)) * float(p.sum()) < float(p[x]):
                row = child
                path.append(child)
                break
            p[x] = 0.0  # reject x: the residual max(p - q, 0) renormalised
        else:
            return torch.tensor(path, device=logits.device), int(torch.multinomial(p / p.sum(), 1, generator=generator))


# ------------------------------------------------------------------------------------------
# Decoding loops
# ------------------------------------------------------------------------------------------


class _Emitter:
    """Collects new tokens and says when to stop: at EOS (kept) or after max_new_tokens."""

    def __init__(self, max_new_tokens: int, eos_token_ids: tuple[int, ...]):
        self.tokens: list[int] = []
        self.max_new_tokens, self.eos = max_new_tokens, set(eos_token_ids)
        self.done = False

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            if token in self.eos or len(self.tokens) >= self.max_new_tokens:
                self.done = True
                return


@torch.inference_mode()
def plain_generate(target, input_ids: torch.Tensor, settings: SpecSettings, generator=None) -> Generation:
    """The baseline: one target forward per token, with the same cache and sampling as the speculative loop."""
    start = time.perf_counter()
    n = input_ids.shape[1]
    cache = new_target_cache(target)
    device = input_ids.device
    logits, _ = target_forward(target, input_ids, torch.arange(n, device=device)[None], cache, last_only=True)
    out = _Emitter(settings.max_new_tokens, settings.eos_token_ids)
    while True:
        token = choose(logits[-1], settings.temperature, settings.top_p, generator)
        out.extend([token])
        if out.done:
            return Generation(out.tokens, seconds=time.perf_counter() - start)
        token_ids, positions = torch.tensor([[token]], device=device), torch.tensor([[n]], device=device)
        logits, _ = target_forward(target, token_ids, positions, cache)
        n += 1


def prefill(target, draft, input_ids, cache, draft_cache, settings: SpecSettings, generator=None):
    """The target caches x_0..x_{n-1} and chooses x_n (the first root); the draft reads x_1..x_n
    with the target features f_0..f_{n-1}. input_ids [1, n] → (x_n, the draft's rows [1, n, H])."""
    n, device = input_ids.shape[1], input_ids.device
    positions = torch.arange(n, device=device)[None]
    aux = list(draft.config.aux_layer_ids)
    logits, features = target_forward(target, input_ids, positions, cache, aux_layer_ids=aux, last_only=True)
    root = choose(logits[-1], settings.temperature, settings.top_p, generator)  # x_n
    new_tokens = torch.cat([input_ids[0, 1:], torch.tensor([root], device=device)])  # [n]
    return root, draft(new_tokens[None], draft.project(features), positions, draft_cache)


def draft_tree(draft, root_hidden: torch.Tensor, draft_cache, n: int, shape: tuple[int, int, int]) -> Tree:
    """Grow the draft's tree below the root x_n (`grow_tree`; a chain when topk is 1).

    root_hidden [1, H]: the draft's output at the root row, the feature of the root's children.
    The tree's rows follow the n committed rows in `draft_cache`; each row's output feeds its children
    (`draft.forward`'s output, as in training: EAGLE 3.1's post-norm state when the draft asks for it).
    """
    depth, topk, total_tokens = shape
    device = root_hidden.device
    row_hidden = root_hidden  # [R, H]: the outputs of the tree's rows so far (root first)

    def expand(tokens, parent_rows, d, row_mask):
        """The frontier (k nodes at depth d) through the draft → child log-probabilities [k, V_draft]."""
        nonlocal row_hidden
        k = tokens.shape[0]
        mask = torch.cat([torch.ones(k, n, dtype=torch.bool, device=device), row_mask], dim=1)  # [k, n + R]
        positions = torch.full((1, k), n - 1 + d, device=device)
        hidden = draft(tokens[None], row_hidden[parent_rows + 1][None], positions, draft_cache, mask[None, None])
        row_hidden = torch.cat([row_hidden, hidden[0]])
        return torch.log_softmax(draft.logits(hidden[0]).float(), dim=-1)

    root_logp = torch.log_softmax(draft.logits(root_hidden[0]).float(), dim=-1)  # [V_draft]
    return grow_tree(expand, root_logp, draft.to_target_ids, depth, topk, total_tokens)


def accept(tree: Tree, logits: torch.Tensor, settings: SpecSettings, generator=None) -> tuple[torch.Tensor, int]:
    """logits [N+1, V] → (accepted path rows [m+1], bonus token). Greedy: the nodes that equal the
    target's argmax; sampling: the lossless rule of `accept_sampling`."""
    if settings.temperature == 0:
        return accept_greedy(tree, logits.argmax(dim=-1))
    return accept_sampling(tree, logits, settings.temperature, settings.top_p, generator)


@torch.inference_mode()
def speculative_generate(target, draft, input_ids: torch.Tensor, settings: SpecSettings, generator=None) -> Generation:
    """Speculative decoding of one prompt input_ids [1, n] with `draft` (EAGLE-1 or EAGLE-3)."""
    start = time.perf_counter()
    aux, device = list(draft.config.aux_layer_ids), input_ids.device
    out, accepted = _Emitter(settings.max_new_tokens, settings.eos_token_ids), []
    cache, draft_cache = new_target_cache(target), DraftCache()
    n = input_ids.shape[1]
    root, draft_rows = prefill(target, draft, input_ids, cache, draft_cache, settings, generator)  # x_n
    out.extend([root])
    while not out.done:
        # 1. draft a tree below the root x_n from the root row's draft output
        tree = draft_tree(draft, draft_rows[0, -1:], draft_cache, n, settings.shape)
        # 2. verify [x_n, nodes] in one target forward: positions n + depth, tree attention mask
        verify_ids = torch.cat([torch.tensor([root], device=device), tree.tokens])[None]  # [1, N+1]
        logits, features = target_forward(
            target, verify_ids, tree.position_ids(n), cache, tree.attention_mask(n), aux_layer_ids=aux
        )  # logits [N+1, V], features [1, N+1, F]
        # 3. accept a root→node path, then the bonus token from the target at its last row
        path, bonus = accept(tree, logits, settings, generator)
        accepted.append(path.shape[0] - 1)
        new_tokens = torch.cat([verify_ids[0, path[1:]], torch.tensor([bonus], device=device)])  # [m+1]
        out.extend(new_tokens.tolist())
        # 4. commit: the target keeps prefix + path; the draft drops its tree rows, then reads
        #    the new rows (tokens x_{n+1}..x_{n+m+1}, target features at rows n..n+m)
        compact_target_cache(cache, n, path)
        draft_cache.crop(n)
        if out.done:
            break
        positions = torch.arange(n, n + path.shape[0], device=device)[None]
        draft_rows = draft(new_tokens[None], draft.project(features[:, path]), positions, draft_cache)
        n, root = n + path.shape[0], bonus
    return Generation(out.tokens, accepted, time.perf_counter() - start)
