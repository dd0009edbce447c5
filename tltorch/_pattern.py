"""PEFT's rank_pattern / alpha_pattern keys, matched in time linear in the module path.

PEFT gives a module the value of the first key k for which re.match(rf"(.*\\.)?({k})$", path)
succeeds: k matches a dot-separated suffix of the path. Keys come from adapter files, and Python's
backtracking matcher takes exponential time on some ("(.|.)*Z" against a 60-character path never
returns). Here the same pattern is parsed by re's own parser and run as a Thompson NFA (Pike's
simulation, without captures): each (instruction, position) pair is visited at most once, so one
match costs O(len(path) * len(program)), with the program capped at _MAX_PROGRAM instructions.

Whether a backtracking match exists does not depend on the order in which alternatives are tried,
so the answer is re.match's, for every construct except those whose meaning depends on that order
or on earlier captures: backreferences, lookarounds, atomic groups and possessive repeats. Keys
using them, or IGNORECASE (whose case folding is not reimplemented here), are refused with a
ValueError; so are keys re cannot parse.
"""
import functools
import re

try:
    from re import _constants as _c, _parser as _p  # Python >= 3.11
except ImportError:  # Python 3.10
    import sre_constants as _c
    import sre_parse as _p

# Instructions after counted repeats are unrolled ("a{3,5}" is 5 of them): bounds one match's work.
_MAX_PROGRAM = 1024
_CHAR, _SPLIT, _JMP, _AT, _MATCH = range(5)
_TYPE_FLAGS = _c.SRE_FLAG_ASCII | _c.SRE_FLAG_LOCALE | _c.SRE_FLAG_UNICODE
_ASCII_SPACE = " \t\n\r\f\v"


def _is_word(ascii_only: bool):
    if ascii_only:
        return lambda ch: ch < "\x80" and (ch.isalnum() or ch == "_")
    return lambda ch: ch.isalnum() or ch == "_"


def _category(code, ascii_only: bool):
    """sre's \\d \\s \\w and their negations: Unicode (str.isdecimal, ...) unless the ASCII flag is set."""
    if code in (_c.CATEGORY_DIGIT, _c.CATEGORY_NOT_DIGIT):
        test = (lambda ch: "0" <= ch <= "9") if ascii_only else str.isdecimal
    elif code in (_c.CATEGORY_SPACE, _c.CATEGORY_NOT_SPACE):
        test = (lambda ch: ch in _ASCII_SPACE) if ascii_only else str.isspace
    elif code in (_c.CATEGORY_WORD, _c.CATEGORY_NOT_WORD):
        test = _is_word(ascii_only)
    else:
        raise ValueError(f"character category {code} is not supported")
    if code in (_c.CATEGORY_NOT_DIGIT, _c.CATEGORY_NOT_SPACE, _c.CATEGORY_NOT_WORD):
        return lambda ch: not test(ch)
    return test


def _char_test(op, av, flags):
    """The one-character predicate of a LITERAL, NOT_LITERAL, ANY or IN item."""
    ascii_only = not flags & _c.SRE_FLAG_UNICODE
    if op is _c.LITERAL:
        c = chr(av)
        return lambda ch: ch == c
    if op is _c.NOT_LITERAL:
        c = chr(av)
        return lambda ch: ch != c
    if op is _c.ANY:
        return (lambda ch: True) if flags & _c.SRE_FLAG_DOTALL else (lambda ch: ch != "\n")
    negate, tests = False, []
    for kind, x in av:
        if kind is _c.NEGATE:
            negate = True
        elif kind is _c.LITERAL:
            tests.append(lambda ch, c=chr(x): ch == c)
        elif kind is _c.RANGE:
            tests.append(lambda ch, lo=chr(x[0]), hi=chr(x[1]): lo <= ch <= hi)
        elif kind is _c.CATEGORY:
            tests.append(_category(x, ascii_only))
        else:
            raise ValueError(f"{kind} in a character class is not supported")
    return lambda ch: any(t(ch) for t in tests) != negate


def _assertion(code, flags):
    """The (text, position) predicate of a zero-width AT item, as sre evaluates it."""
    multiline = bool(flags & _c.SRE_FLAG_MULTILINE)
    if code is _c.AT_BEGINNING:
        return lambda s, i: i == 0 or (multiline and s[i - 1] == "\n")
    if code is _c.AT_BEGINNING_STRING:
        return lambda s, i: i == 0
    if code is _c.AT_END:
        if multiline:
            return lambda s, i: i == len(s) or s[i] == "\n"
        return lambda s, i: i == len(s) or (i == len(s) - 1 and s[i] == "\n")
    if code is _c.AT_END_STRING:
        return lambda s, i: i == len(s)
    if code in (_c.AT_BOUNDARY, _c.AT_NON_BOUNDARY):
        word, want = _is_word(not flags & _c.SRE_FLAG_UNICODE), code is _c.AT_BOUNDARY

        def boundary(s, i):
            if not s:
                return False
            return ((i > 0 and word(s[i - 1])) != (i < len(s) and word(s[i]))) == want
        return boundary
    raise ValueError(f"{code} is not supported")


def _grow(prog, ins=None) -> int:
    if len(prog) >= _MAX_PROGRAM:
        raise ValueError(f"the pattern unrolls to more than {_MAX_PROGRAM} NFA instructions")
    prog.append(ins)
    return len(prog) - 1


def _emit(items, flags, prog) -> None:
    """Append the NFA instructions of parsed items to prog."""
    for op, av in items:
        if op in (_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN):
            _grow(prog, (_CHAR, _char_test(op, av, flags)))
        elif op is _c.AT:
            _grow(prog, (_AT, _assertion(av, flags)))
        elif op is _c.SUBPATTERN:
            _, add, remove, sub = av
            inner = (flags & ~_TYPE_FLAGS if add & _TYPE_FLAGS else flags) | add
            if inner & ~remove & _c.SRE_FLAG_IGNORECASE:
                raise ValueError("IGNORECASE is not supported")
            _emit(sub, inner & ~remove, prog)
        elif op is _c.BRANCH:
            alts, ends = av[1], []
            for alt in alts[:-1]:
                split = _grow(prog)
                _emit(alt, flags, prog)
                ends.append(_grow(prog))
                prog[split] = (_SPLIT, split + 1, len(prog))
            _emit(alts[-1], flags, prog)
            for j in ends:
                prog[j] = (_JMP, len(prog))
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT):  # greedy or lazy: the same set of matches
            lo, hi, sub = av
            if lo > _MAX_PROGRAM or (hi != _c.MAXREPEAT and hi > _MAX_PROGRAM):
                raise ValueError(f"the pattern unrolls to more than {_MAX_PROGRAM} NFA instructions")
            for _ in range(lo):
                _emit(sub, flags, prog)
            if hi == _c.MAXREPEAT:
                loop = _grow(prog)
                _emit(sub, flags, prog)
                _grow(prog, (_JMP, loop))
                prog[loop] = (_SPLIT, loop + 1, len(prog))
            else:
                holes = []
                for _ in range(hi - lo):
                    holes.append(_grow(prog))
                    _emit(sub, flags, prog)
                for h in holes:
                    prog[h] = (_SPLIT, h + 1, len(prog))
        else:
            what = {_c.GROUPREF: "a backreference", _c.GROUPREF_EXISTS: "a conditional group",
                    _c.ASSERT: "a lookaround", _c.ASSERT_NOT: "a lookaround"}.get(op, str(op))
            raise ValueError(f"{what} is not supported (only patterns without backtracking-order "
                             "semantics are matched, in linear time)")


def _plain_body(parsed, flags):
    """The key's items when the parse is exactly [(.*\\.)?, (key), $] with no flags and a key of
    single characters, else None."""
    if len(parsed) != 3 or flags & (_c.SRE_FLAG_DOTALL | _c.SRE_FLAG_MULTILINE):
        return None
    (op, av), end = parsed[1], parsed[2]
    if op is not _c.SUBPATTERN or av[1] or av[2] or end != (_c.AT, _c.AT_END):
        return None
    body = av[3]
    if all(o in (_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN) for o, _ in body):
        return body
    return None


class PatternKey:
    """One rank_pattern / alpha_pattern key: matches(path) is re.match(rf"(.*\\.)?({key})$", path)
    is not None, computed in O(len(path) * program size). ValueError for keys refused (see above)."""

    def __init__(self, key: str):
        if not isinstance(key, str):
            raise TypeError(f"a pattern key must be a str, not {type(key).__name__}")
        try:
            parsed = _p.parse(rf"(.*\.)?({key})$", 0)
        except (re.error, RecursionError, OverflowError) as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
        flags = parsed.state.flags
        if flags & _c.SRE_FLAG_IGNORECASE:
            raise ValueError("IGNORECASE is not supported")
        self.key = key
        # A key of single characters (a module name, escaped or with '.' as any character) has one
        # width, so it can only end where '$' allows: compared there without the NFA.
        body = _plain_body(parsed, flags)
        if body is not None:
            self._fixed = [_char_test(op, av, flags) for op, av in body]
            self._prog = None
            return
        prog = []
        try:
            _emit(parsed, flags, prog)
        except RecursionError:
            raise ValueError("the pattern nests too deeply") from None
        _grow(prog, (_MATCH,))
        self._fixed, self._prog = None, prog

    def matches(self, path: str) -> bool:
        if self._prog is None:
            return self._matches_fixed(path)
        prog, n = self._prog, len(path)
        threads = self._closure([0], path, 0)
        for i in range(n + 1):
            step = []
            for pc in threads:
                ins = prog[pc]
                if ins[0] == _MATCH:
                    return True
                if i < n and ins[1](path[i]):
                    step.append(pc + 1)
            if not step:
                return False
            threads = self._closure(step, path, i + 1)
        return False

    def _closure(self, pcs, s, i):
        """The CHAR and MATCH instructions reachable from pcs at position i without reading a character."""
        prog, out, seen, stack = self._prog, [], set(), list(pcs)
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            ins = prog[pc]
            if ins[0] == _CHAR or ins[0] == _MATCH:
                out.append(pc)
            elif ins[0] == _SPLIT:
                stack += (ins[2], ins[1])
            elif ins[0] == _JMP:
                stack.append(ins[1])
            elif ins[1](s, i):
                stack.append(pc + 1)
        return out

    def _matches_fixed(self, s: str) -> bool:
        k, n = len(self._fixed), len(s)
        ends = (n, n - 1) if s.endswith("\n") else (n,)  # '$' matches before a final newline too
        for end in ends:
            start = end - k
            if start < 0:
                continue
            # "(.*\.)?" : nothing, or anything up to a '.' just before the key ('.' does not match '\n')
            if start and not (s[start - 1] == "." and "\n" not in s[:start - 1]):
                continue
            if all(t(ch) for t, ch in zip(self._fixed, s[start:end])):
                return True
        return False


@functools.lru_cache(maxsize=4096)
def pattern_key(key: str) -> PatternKey:
    """The compiled key (cached: a config's keys are tried against every adapted layer's path)."""
    return PatternKey(key)


def first_match(patterns: dict, path: str):
    """PEFT's lookup: the first key of patterns (in order) that matches a dot-separated suffix of
    path, or None."""
    for key in patterns:
        if pattern_key(key).matches(path):
            return key
    return None
