"""A Dockerfile's instructions, grouped into stages.

Handles what Docker's parser does with the text: parser directives at the top, comment
lines (also inside a continued instruction), "\\" line continuations and case-insensitive
keywords. Heredocs and a changed escape character are reported as unsupported.
"""

import re
import shlex


class ParseError(Exception):
    pass


class Instruction:
    def __init__(self, line, keyword, args):
        self.line = line        # where it starts, 1-based
        self.keyword = keyword  # upper case
        self.args = args        # the rest, continuations joined with a space

    def flags_and_words(self):
        """("--flag=value" list, other words) of a shell-form argument list."""
        try:
            words = shlex.split(self.args)
        except ValueError as e:
            raise ParseError(f"line {self.line}: {self.keyword}: {e}")
        flags = [w for w in words if w.startswith("--")]
        rest = [w for w in words if not w.startswith("--")]
        return flags, rest


class Stage:
    def __init__(self, image, name, line):
        self.image, self.name, self.line = image, name, line
        self.instructions = []


def instructions(text):
    out, pending, start = [], "", 0
    in_directives = True
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if in_directives:
            m = re.match(r"#\s*([a-zA-Z]+)\s*=\s*(.*)$", line)
            if m:
                if m.group(1).lower() == "escape" and m.group(2).strip() != "\\":
                    raise ParseError(f"line {n}: only the default escape character is supported")
                continue
            in_directives = False
        if line.startswith("#") or not line:
            continue
        if not pending:
            start = n
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        pending += line
        keyword, _, args = pending.strip().partition(" ")
        if "<<" in args and keyword.upper() in ("RUN", "COPY"):
            raise ParseError(f"line {start}: heredocs are not supported")
        out.append(Instruction(start, keyword.upper(), args.strip()))
        pending = ""
    if pending:
        raise ParseError(f"line {start}: the last instruction ends with a continuation")
    return out


def stages(text):
    result = []
    for ins in instructions(text):
        if ins.keyword == "FROM":
            words = ins.args.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            if len(words) not in (1, 3) or (len(words) == 3 and name is None):
                raise ParseError(f"line {ins.line}: cannot read FROM {ins.args}")
            result.append(Stage(words[0], name, ins.line))
        elif ins.keyword == "ARG" and not result:
            raise ParseError(f"line {ins.line}: ARG before FROM is not supported")
        elif not result:
            raise ParseError(f"line {ins.line}: {ins.keyword} before the first FROM")
        else:
            result[-1].instructions.append(ins)
    if not result:
        raise ParseError("no FROM instruction")
    return result
