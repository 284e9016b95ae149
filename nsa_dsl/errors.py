"""The one error type of nsa-dsl.

Every problem with a spec (syntax, names, values) and every problem with the
tensors handed to a generated op is raised as :class:`SpecError`.  An error
that points into a spec renders like a compiler diagnostic::

    examples/bad.nsa:7:33: error[E204]: stride 12 does not divide block 32
        branch cmp = compress(block = 32, stride = 12)
                                          ^^^^^^^^^^^
    hint: try 8 or 16
"""
from __future__ import annotations

from nsa_dsl.language.ir import Span

#: Every error code, with its one-line meaning: the one table every raise uses (a code not in it
#: is a bug; tests check each raise and docs/LANGUAGE.md against it). Codes are stable across
#: releases: a code is never renumbered or reused. E1xx syntax and files, E2xx values, E3xx names
#: and references, E4xx the output, E6xx calls of the op / reference, E63x `nsa-dsl show`, E65x
#: context parallelism, E7xx `SparseAttention`, E8xx the KV cache and decoding.
CODES: dict[str, str] = {
    'E100': 'unexpected token ("expected \'=\' after branch name \'cmp\', found name \'compress\'")',
    'E101': 'unexpected character (`:` for `=`, quotes, decimals, non-ASCII, NUL)',
    'E102': 'the file ends early (a missing `}` or `)`)',
    'E103': 'an expression nested too deeply (more than 64 parentheses or signs)',
    'E104': 'the file is too large (over 1 MiB, or over 10 000 tokens)',
    'E105': 'the file cannot be read (missing, a directory, no permission)',
    'E106': 'the file is not UTF-8 text',
    'E107': 'the file declares no `attention` block',
    'E108': 'a block declares no branch',
    'E110': 'several blocks and no name chosen (`--name`, `name=`)',
    'E111': 'no block of that name',
    'E116': 'a branch name that is not a name of at most 64 letters, digits and `_`',
    'E200': 'a number or intermediate result beyond 2**62',
    'E201': 'division by zero',
    'E202': '`/` that does not divide exactly (use `//`)',
    'E203': 'a size, head count or dimension that is not positive',
    'E204': 'compress `stride` does not divide its `block`',
    'E205': 'a select `block` is not a multiple of the stride of its score source',
    'E206': 'a count (`keep_first`, `keep_last`, `sinks`) below zero',
    'E207': 'a size above 2**20',
    'E208': '`top_k < keep_first + keep_last`',
    'E209': '`heads` is not a multiple of `kv_heads`',
    'E210': 'a head (or indexer) dimension that is not a multiple of 16',
    'E211': 'a head (or indexer) dimension above 256',
    'E213': 'a value of the wrong type (a name where a number goes, `causal = 1`, `pool = 3`)',
    'E214': 'a value outside its choices (`pool = max`)',
    'E215': 'more than 64 query heads per kv head',
    'E216': 'a hand-built IR with a value that is not a validated number (caught before rendering)',
    'E217': '`top_k` above what the kernels rank (64 blocks; 8192 tokens for an indexer score)',
    'E218': 'a scoring compress branch with more than 64 strides per block, or a select block of more than 256 of its strides',
    'E219': 'learned pooling (`pool = linear | mlp`) over blocks of more than 512 keys',
    'E220': '`query_block` that is not a power of two from 1 to 128',
    'E221': '`score = <indexer>` on a select with `block` or `query_block` other than 1',
    'E223': 'an indexer named in the output (it scores a select branch, it has no output)',
    'E300': 'an unknown constant in an expression (or one defined later)',
    'E301': 'a `let` defined twice',
    'E302': 'two blocks with one name',
    'E303': 'two branches with one name',
    'E304': 'a field set twice',
    'E305': 'a branch parameter given twice',
    'E306': 'an unknown field',
    'E307': 'an unknown branch parameter',
    'E308': 'an unknown branch kind',
    'E309': 'a missing required parameter',
    'E310': 'a reference (`score`, output) to a branch that does not exist',
    'E311': 'a reference to a branch of the wrong kind (`score = swa`, a window)',
    'E312': 'a reserved name (`mean_pool`) used for a branch',
    'E313': '`head_dim` together with `qk_dim` or `v_dim`',
    'E400': 'an unknown combiner (not `gate` or `sum`)',
    'E401': 'a branch listed twice in the output',
    'E402': 'a branch that is never used (not in the output, not a used score source)',
    'E403': 'a gate activation other than `sigmoid`',
    'E404': 'a gate or sum with nothing to combine, or a gate without its activation',
    'E405': 'a block without `output`',
    'E406': '`output` declared twice',
    'E600': 'not a spec: `compile`, `reference` or a decode call given something other than a `Spec` (or a path, where one is accepted)',
    'E601': 'a tensor of the wrong rank or shape (the message gives expected and actual)',
    'E602': 'tensors disagree with a shape field the spec declares',
    'E603': 'query heads not a multiple of kv heads',
    'E604': 'more than 64 query heads per kv head',
    'E605': 'a head dim the kernels cannot take (multiples of 16, 16 to 256)',
    'E606': 'a dtype the call cannot take (the kernels: float16, bfloat16, float32), or inputs of mixed dtypes',
    'E607': 'inputs on different devices, a device the kernels cannot run on (`meta`, ...), or CPU tensors without the interpreter',
    'E608': 'per-branch keys/values missing or naming unknown branches',
    'E609': 'gates missing for `gate(...)`, or given for `sum`/single outputs',
    'E610': 'caller-supplied compressed keys malformed, or naming a branch that is not a compress branch',
    'E611': 'caller-supplied compressed keys missing for a learned pool',
    'E612': 'shapes unknown when a plan or source is asked for (not declared, not given, no call bound them yet)',
    'E613': 'an unknown kernel name',
    'E614': 'a spec feature the generated kernels do not run yet (the reference does)',
    'E615': '`nsa-dsl bench` without a CUDA GPU',
    'E616': 'autotuning without a CUDA GPU (`nsa-dsl tune`, `op.tune`)',
    'E617': '`nsa-dsl bench`: `--plot` without matplotlib, or `--heads` not a multiple of `--kv-heads`',
    'E618': 'a softmax scale that is not a finite number > 0',
    'E619': 'bfloat16 on the CPU interpreter (its bf16 matrix products are wrong)',
    'E620': '`cu_seqlens` not a 1-D int32/int64 tensor with at least two entries',
    'E621': '`cu_seqlens` on another device than q',
    'E622': 'a batch size other than 1 with `cu_seqlens`',
    'E623': '`cu_seqlens` not starting at 0',
    'E624': '`cu_seqlens` decreasing',
    'E625': '`cu_seqlens` not ending at the number of tokens T',
    'E626': 'caller-given selections (`indices=`) malformed, or naming a branch that is not a select branch',
    'E627': 'indexer inputs (`index=`) missing, malformed, or naming a branch that is not an indexer',
    'E628': '`aux.block_mask` of a branch that is not a select with `query_block >= 16`',
    'E629': 'queries that start (`q_start`) inside a `query_block` group, or past the keys',
    'E630': '`nsa-dsl show` without matplotlib',
    'E631': '`nsa-dsl show`: a bad argument (length, output file) or a branch it cannot draw',
    'E632': '`nsa-dsl show --from-model`: a checkpoint that cannot be read',
    'E633': '`nsa-dsl show --from-model`: a checkpoint of another attention',
    'E634': "`nsa-dsl show --from-model`: a checkpoint's model or layer does not fit",
    'E635': "`nsa-dsl show --from-model`: the example model's code cannot be found",
    'E640': 'a command-line argument the command cannot use (a path it cannot write, a length beyond its limit)',
    'E650': 'context parallel: a `cp_group` / `cp_mesh` that is not a process group or a 1-D device mesh, or torch.distributed not initialised',
    'E651': 'context parallel: a shard that does not fit the layout (T splits into 2N equal chunks; rank r holds chunks r and 2N-1-r)',
    'E701': 'a `SparseAttention` shape argument that conflicts with the spec',
    'E702': 'a shape neither declared by the spec nor passed to `SparseAttention`',
    'E703': 'a bad `SparseAttention` constructor argument (sizes, `backend`, `spec` type)',
    'E704': '`x` with the wrong number of dims or the wrong hidden size',
    'E705': "`x` with a dtype or device other than the layer's parameters",
    'E706': '`cu_seqlens` together with a KV cache',
    'E720': '`convert()`: a model it cannot take (not a Llama, Mistral, Qwen2 or Qwen3 causal LM, converted already), a spec it cannot record (no source text, not causal), or a dense layer running under the `nsa_dsl` attention',
    'E721': 'an attention mask the NSA layers of a transformers model cannot take (not 2-D, or padding together with packed sequences)',
    'E722': '`from_pretrained`: a folder that holds no converted model (no `nsa_dsl` config field) or lacks its NSA weights',
    'E723': 'a transformers cache used against the NSA layers (dense keys in a slot, `update()`, `crop()`, not a `Cache`)',
    'E801': 'a bad `NSACache` / `PagedNSACache` argument (sizes, dtype, page size, page order, sequences to free)',
    'E802': 'per-branch keys/values for the cache malformed',
    'E803': 'keys/values appended with the wrong shape, device or dtype',
    'E804': '`n_new` that is not integer counts in range',
    'E805': "an append past the cache's `max_len` (its capacity)",
    'E806': 'learned pooling needed but no `pool=` given to `append`',
    'E809': "a cache that does not belong to the layer's spec or batch",
    'E811': 'a decode step of another cache, from before its `reset()` / `free()` (or, from a kernel append, its next append), or beyond its lengths',
    'E812': 'a KV cache for a spec that is not causal',
    'E813': 'a block table, its lengths or page pools malformed (not int32 [B, W] / [B] on the pools\' device, not a `PagedNSACache`)',
    'E814': 'a block table entry that is not a page of the pool, or a page held by two sequences',
    'E815': "a length past the block table's pages (W * page_size positions)",
    'E816': 'the page pool has no free page left for an append',
}


class SpecError(ValueError):
    """A bad spec or a bad call, with a stable code, a location and a hint.

    ``code`` is stable across releases (tests and tools match on it);
    ``span`` is None for errors that have no place in a file (tensor checks).
    """

    def __init__(self, code: str, message: str, span: Span | None = None,
                 hint: str | None = None, source: str | None = None):
        assert code in CODES, f"error code {code} is not in nsa_dsl.errors.CODES"
        self.code = code
        self.message = message
        self.span = span
        self.hint = hint
        self.source = source
        super().__init__(self.render())

    # pickling keeps the rendered message and the fields
    def __reduce__(self):
        return (SpecError, (self.code, self.message, self.span, self.hint, self.source))

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def column(self) -> int | None:
        return self.span.column if self.span else None

    def source_line(self) -> str | None:
        if self.span is None or self.source is None:
            return None
        # split on "\n" only, as the lexer counts lines (splitlines() also
        # breaks at \f, \x1c, \u2028, ... and would shift the caret's line)
        lines = self.source.split("\n")
        if 1 <= self.span.line <= len(lines):
            return lines[self.span.line - 1].rstrip("\r")
        return None

    def render(self) -> str:
        if self.span is None:
            out = f"error[{self.code}]: {self.message}"
        else:
            out = (f"{self.span.file}:{self.span.line}:{self.span.column}: "
                   f"error[{self.code}]: {self.message}")
        text = self.source_line()
        if text is not None:
            text = text.expandtabs(1)
            start = max(self.span.column - 1, 0)
            if self.span.end_line == self.span.line and self.span.end_column > self.span.column:
                width = self.span.end_column - self.span.column
            else:
                width = 1
            width = max(1, min(width, max(len(text) - start, 1)))
            out += f"\n    {text}\n    {' ' * start}{'^' * width}"
        if self.hint:
            out += f"\n    hint: {self.hint}"
        return out

    def __str__(self) -> str:  # always the full diagnostic
        return self.render()
