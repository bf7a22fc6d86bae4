"""Every prefix of a conversation from one rendering, for templates that render each message on its own.

Masking needs, per assistant turn, the rendering of the conversation up to the turn (with the generation
prompt) and up to the turn's end (template.py): two renders a turn, each as long as the conversation so
far, so template work grows with turns². Most chat templates are shaped

    prologue      may read messages[0], test `messages`,    {% if messages[0]['role'] == 'system' %}...
                  set names
    one loop      over messages or messages[1:]             {% for message in messages %}
      body        reads its message, loop.index/index0/first/previtem, names the prologue set
    epilogue      reads add_generation_prompt and the inputs, never the messages or what the loop set

and then, for every k ≥ 1, render(messages[:k], g) = S_k + E(g): S_k, what the whole conversation's
rendering has written when its loop takes the first message at or after k (or ends), and E(g), the epilogue,
the same for every prefix. `message_local` proves that shape from the template's syntax tree, conservatively:
any other shape, and every construct it does not list (macros, `loop.last`, filters over the messages,
`{% generation %}`, ...), leaves the template to rendering every prefix. `PrefixRenders` takes every S_k from
one rendering of the whole conversation, by watching its loop take the messages, and E(g) from renderings of
the first message alone; the epilogue is checked there against the whole rendering's. A conversation's
prefixes then cost one rendering of it and two of one message. Most epilogues read nothing but
add_generation_prompt and the template's inputs (`{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}`,
or none at all): `epilogue_reads` proves that too, and E(g) found from one conversation then serves every other
with the same inputs, so that each costs the one rendering.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from jinja2 import nodes

# What the body may read of its loop: each depends on the messages taken so far only.
LOOP_ATTRIBUTES = frozenset({"index", "index0", "first", "previtem"})
# Constructs the proof does not cover (output captured or emitted elsewhere, templates calling templates,
# `{% generation %}` blocks, loop controls).
UNSUPPORTED = (
    nodes.Macro,
    nodes.CallBlock,
    nodes.FilterBlock,
    nodes.AssignBlock,
    nodes.Block,
    nodes.Include,
    nodes.Import,
    nodes.FromImport,
    nodes.Extends,
    nodes.Scope,
    nodes.OverlayScope,
    nodes.With,
    nodes.EvalContextModifier,
    nodes.Break,
    nodes.Continue,
    nodes.ExprStmt,
)


# What an epilogue that writes the same for every conversation may be made of: output, and tests, comparisons and
# concatenations of names and constants. No call, filter, attribute or item: nothing that may depend on more than
# the names it reads (a clock, a random choice).
CONSTANT_EPILOGUE = (
    nodes.Output,
    nodes.TemplateData,
    nodes.Const,
    nodes.If,
    nodes.Name,
    nodes.Test,
    nodes.Compare,
    nodes.Operand,
    nodes.And,
    nodes.Or,
    nodes.Not,
    nodes.Concat,
    nodes.Add,
    nodes.CondExpr,
)


def message_local(tree: nodes.Template) -> bool:
    """Whether the template has the shape above, so that each prefix's rendering is S_k + E(g)."""
    if any(True for _ in tree.find_all(UNSUPPORTED)):
        return False
    loops = [(index, node) for index, node in enumerate(tree.body) if isinstance(node, nodes.For)]
    if len(loops) != 1:
        return False
    position, loop = loops[0]
    prologue, epilogue = tree.body[:position], tree.body[position + 1 :]
    if loop.else_ or loop.test is not None or loop.recursive or not isinstance(loop.target, nodes.Name):
        return False
    # The loop's sequence: the messages (from the first or the second), directly or through names that the
    # prologue alone sets to them.
    held: set[str] = set()
    allowed: set[int] = set()  # the `messages` Name nodes read in a permitted way
    if isinstance(loop.iter, nodes.Name) and loop.iter.name != "messages":
        held.add(loop.iter.name)
    elif _is_messages(loop.iter):
        allowed.add(id(_messages_name(loop.iter)))
    else:
        return False
    for assign in _walk(tree.body, nodes.Assign):
        if isinstance(assign.target, nodes.Name) and assign.target.name in held:
            if not (any(assign is node for node in _walk(prologue, nodes.Assign)) and _is_messages(assign.node)):
                return False
            allowed.add(id(_messages_name(assign.node)))
    allowed |= {
        id(item.node)
        for item in _walk(tree.body, nodes.Getitem)
        if _is_name(item.node, "messages") and isinstance(item.arg, nodes.Const) and item.arg.value == 0
    }
    # Whether there are messages at all: true for every prefix rendered (k ≥ 1).
    allowed |= {id(test.node) for test in _walk(tree.body, nodes.Not) if _is_name(test.node, "messages")}
    allowed |= {id(branch.test) for branch in _walk(tree.body, nodes.If) if _is_name(branch.test, "messages")}
    if any(_is_name(name, "messages") and id(name) not in allowed for name in _walk(tree.body, nodes.Name)):
        return False
    # `loop` only for what depends on the messages taken so far.
    allowed_loop = {
        id(attribute.node)
        for attribute in _walk(tree.body, nodes.Getattr)
        if _is_name(attribute.node, "loop") and attribute.attr in LOOP_ATTRIBUTES
    }
    if any(_is_name(name, "loop") and id(name) not in allowed_loop for name in _walk(tree.body, nodes.Name)):
        return False
    # What may differ between prefixes, or between the renders with and without the generation prompt.
    set_by_loop = (
        {loop.target.name}
        | {name.name for name in _walk(loop.body, nodes.Name) if name.ctx == "store"}
        | {ref.name for ref in _walk(loop.body, nodes.NSRef)}
    )
    before_epilogue = {"add_generation_prompt"} | held
    return (
        not _reads(prologue, before_epilogue)
        and not _reads(loop.body, before_epilogue)
        and not _reads(epilogue, set_by_loop | held)
    )


def epilogue_reads(tree: nodes.Template) -> frozenset[str] | None:
    """For a `message_local` template: the names its epilogue reads besides add_generation_prompt, when what it
    writes depends on them and add_generation_prompt alone (the template's inputs: special tokens, tools; never the
    messages nor a name the prologue or the loop sets), so that E(g) is the same for every conversation rendered
    with the same values of those names. None when it may depend on more."""
    loop_at = next(index for index, node in enumerate(tree.body) if isinstance(node, nodes.For))
    epilogue = tree.body[loop_at + 1 :]
    if any(not isinstance(node, CONSTANT_EPILOGUE) for node in _walk(epilogue, nodes.Node)):
        return None
    before = tree.body[: loop_at + 1]
    set_before = (
        {"messages", "loop"}
        | {name.name for name in _walk(before, nodes.Name) if name.ctx != "load"}
        | {ref.name for ref in _walk(before, nodes.NSRef)}
    )
    read = {name.name for name in _walk(epilogue, nodes.Name) if name.ctx == "load"}
    return None if read & set_before else frozenset(read - {"add_generation_prompt"})


def _walk(roots: list[nodes.Node], kind: type | tuple[type, ...]) -> Iterator[Any]:
    """Every node of `kind` in `roots`, the roots included."""
    for root in roots:
        if isinstance(root, kind):
            yield root
        yield from root.find_all(kind)


def _is_name(node: nodes.Node, name: str) -> bool:
    return isinstance(node, nodes.Name) and node.name == name


def _is_messages(node: nodes.Node) -> bool:
    """`messages`, `messages[0:]` or `messages[1:]`."""
    if _is_name(node, "messages"):
        return True
    return (
        isinstance(node, nodes.Getitem)
        and _is_name(node.node, "messages")
        and isinstance(node.arg, nodes.Slice)
        and node.arg.stop is None
        and node.arg.step is None
        and (node.arg.start is None or (isinstance(node.arg.start, nodes.Const) and node.arg.start.value in (0, 1)))
    )


def _messages_name(node: nodes.Node) -> nodes.Name:
    """The `messages` Name in a node `_is_messages` accepted."""
    inner = node.node if isinstance(node, nodes.Getitem) else node
    if not isinstance(inner, nodes.Name):
        raise TypeError(f"{node!r} is not `messages` nor a slice of it")
    return inner


def _reads(roots: list[nodes.Node], names: set[str]) -> bool:
    return any(name.ctx == "load" and name.name in names for name in _walk(roots, nodes.Name))


class PrefixRenders:
    """The renderings of every prefix of one conversation, for a `message_local` template.

    `generate(messages, add_generation_prompt)` yields the rendering's pieces as the template writes them, and
    `render(messages, add_generation_prompt)` returns it, both with the run's template and inputs. The whole
    conversation is generated once here, watched (`_Watched`); its first message alone is rendered twice
    when E(g) is first needed. `epilogues`, for an epilogue that `epilogue_reads` proves the same for other
    conversations: E(g) by g as found for one of them, shared (filled here when empty, and then taken whenever
    this rendering ends with its E(False))."""

    def __init__(
        self,
        messages: list[dict[str, Any]],
        generate: Callable[[list[Any], bool], Iterator[str]],
        render: Callable[[list[dict[str, Any]], bool], str],
        epilogues: dict[bool, str] | None = None,
    ) -> None:
        self.messages, self.render, self.known_epilogues = messages, render, epilogues
        self.cuts: dict[int, int] = {}
        self.written = 0
        positions = {id(message): index for index, message in enumerate(messages)}
        self.end: int | None = None

        def taken(message: Any) -> None:
            index = positions.get(id(message))
            if index is not None:
                self.cuts.setdefault(index, self.written)

        def ended() -> None:
            self.end = self.written

        parts = []
        for chunk in generate(_Watched(messages, taken, ended), False):
            parts.append(chunk)
            self.written += len(chunk)
        self.full = "".join(parts)
        self._epilogues: dict[bool, str] | None = None
        self._before: list[int] | None = None

    def __call__(self, count: int, add_generation_prompt: bool) -> str | None:
        """render(messages[:count], add_generation_prompt), or None when it must be rendered."""
        if count == len(self.messages) and not add_generation_prompt:
            return self.full
        written = self._written_before(count)
        epilogue = self._epilogue(add_generation_prompt) if written is not None and count >= 1 else None
        return None if epilogue is None else self.full[:written] + epilogue

    def _written_before(self, count: int) -> int | None:
        """S_count's length: where the loop took its first message at or after `count`, or ended."""
        if self.end is None:
            return None
        if self._before is None:  # for every count at once, from the last message back: linear, not quadratic
            self._before = [self.end] * (len(self.messages) + 1)
            for index in range(len(self.messages) - 1, -1, -1):
                self._before[index] = min(self.cuts.get(index, self.end), self._before[index + 1])
        return self._before[min(count, len(self.messages))]

    def _epilogue(self, add_generation_prompt: bool) -> str | None:
        """E(g), from the first message alone; None when its rendering is not S_1 + the epilogue the whole
        rendering ends with."""
        known = self.known_epilogues
        if self._epilogues is None and known and known[False] == self.full[self.end :]:
            self._epilogues = known
        if self._epilogues is None:
            first = self.full[: self._written_before(1)]
            alone = {g: self.render(self.messages[:1], g) for g in (False, True)}
            ends = self.full[self.end :]
            if not all(text.startswith(first) for text in alone.values()) or alone[False][len(first) :] != ends:
                self._epilogues = {}
            else:
                self._epilogues = {g: text[len(first) :] for g, text in alone.items()}
                if known is not None and not known:
                    known.update(self._epilogues)
        return self._epilogues.get(add_generation_prompt)


class _Watched(list):
    """The messages as the template reads them, calling `taken(message)` when its loop takes each one and
    `ended()` when the loop ends. A slice (`messages[1:]`) is watched too."""

    def __init__(self, items: Any, taken: Callable[[Any], None], ended: Callable[[], None]) -> None:
        super().__init__(items)
        self._taken, self._ended = taken, ended

    def __getitem__(self, key: Any) -> Any:
        item = super().__getitem__(key)
        return _Watched(item, self._taken, self._ended) if isinstance(key, slice) else item

    def __iter__(self) -> Iterator[Any]:
        for item in super().__iter__():
            self._taken(item)
            yield item
        self._ended()
