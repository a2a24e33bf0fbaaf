"""Safe arithmetic: a small Pratt parser over a tokenizer. Never eval, never ast/compile.

Grammar (lowest to highest precedence): + -; * / // %; unary + -; ** (right-assoc,
binds tighter than unary minus on its left: -2**2 == -4, like Python); calls and
parentheses. Integers stay exact; a power whose result would exceed MAX_BITS bits is
refused instead of exhausting memory, and nesting deeper than MAX_DEPTH is refused
instead of overflowing the stack.
"""
from __future__ import annotations

import math
import re

MAX_BITS = 4096
MAX_DEPTH = 64
_TOKEN = re.compile(r"\s*(?:(\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\d+)|"
                    r"(\*\*|//|[-+*/%^(),])|([A-Za-z_][A-Za-z_0-9]*))")

CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _log(x: float, base: float | None = None) -> float:
    return math.log(x) if base is None else math.log(x, base)


FUNCTIONS = {
    "sqrt": (math.sqrt, 1, 1), "abs": (abs, 1, 1), "round": (round, 1, 2), "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1), "exp": (math.exp, 1, 1), "log": (_log, 1, 2), "log10": (math.log10, 1, 1),
    "log2": (math.log2, 1, 1), "sin": (math.sin, 1, 1), "cos": (math.cos, 1, 1), "tan": (math.tan, 1, 1),
    "asin": (math.asin, 1, 1), "acos": (math.acos, 1, 1), "atan": (math.atan, 1, 1),
    "min": (min, 1, 64), "max": (max, 1, 64),
}


class CalcError(ValueError):
    aios_code = "INVALID_ARGUMENT"


def tokenize(text: str) -> list[tuple[str, object]]:
    tokens: list[tuple[str, object]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise CalcError(f"unexpected character {text[pos:].lstrip()[:1]!r} at position {pos + 1}")
        num, op, name = m.groups()
        if num is not None:
            tokens.append(("num", float(num) if any(c in num for c in ".eE") else int(num)))
        elif op is not None:
            tokens.append(("op", "**" if op == "^" else op))
        else:
            tokens.append(("name", name))
        pos = m.end()
    tokens.append(("end", None))
    return tokens


class Parser:
    def __init__(self, text: str) -> None:
        self.tokens = tokenize(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> tuple[str, object]:
        return self.tokens[self.i]

    def take(self) -> tuple[str, object]:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def expect(self, op: str) -> None:
        kind, value = self.take()
        if (kind, value) != ("op", op):
            raise CalcError(f"expected {op!r} but found {_show(kind, value)}")

    def parse(self) -> float | int:
        value = self.sum()
        kind, tok = self.peek()
        if kind != "end":
            raise CalcError(f"unexpected {_show(kind, tok)} after a complete expression")
        return value

    def sum(self) -> float | int:
        value = self.product()
        while self.peek() in (("op", "+"), ("op", "-")):
            op = self.take()[1]
            right = self.product()
            value = value + right if op == "+" else value - right
        return value

    def product(self) -> float | int:
        value = self.unary()
        while self.peek() in (("op", "*"), ("op", "/"), ("op", "//"), ("op", "%")):
            op = self.take()[1]
            right = self.unary()
            if op == "*":
                if isinstance(value, int) and isinstance(right, int) and value.bit_length() + right.bit_length() > MAX_BITS:
                    raise CalcError(f"the result would have more than {MAX_BITS} bits")
                value = value * right
            elif right == 0:
                raise CalcError("division by zero")
            elif op == "/":
                value = value / right
            elif op == "//":
                value = value // right
            else:
                value = value % right
        return value

    def unary(self) -> float | int:
        if self.peek() in (("op", "-"), ("op", "+")):
            op = self.take()[1]
            self._enter()
            value = self.unary()
            self.depth -= 1
            return -value if op == "-" else +value
        return self.power()

    def power(self) -> float | int:
        base = self.atom()
        if self.peek() == ("op", "**"):
            self.take()
            self._enter()
            exponent = self.unary()  # right-associative; allows 2**-1
            self.depth -= 1
            return _pow(base, exponent)
        return base

    def atom(self) -> float | int:
        kind, value = self.take()
        if kind == "num":
            return value  # type: ignore[return-value]
        if (kind, value) == ("op", "("):
            self._enter()
            inner = self.sum()
            self.expect(")")
            self.depth -= 1
            return inner
        if kind == "name":
            name = str(value)
            if self.peek() == ("op", "("):
                return self.call(name)
            if name in CONSTANTS:
                return CONSTANTS[name]
            raise CalcError(f"unknown name {name!r}; constants: {sorted(CONSTANTS)}, functions: {sorted(FUNCTIONS)}")
        raise CalcError(f"unexpected {_show(kind, value)}")

    def call(self, name: str) -> float | int:
        if name not in FUNCTIONS:
            raise CalcError(f"unknown function {name!r}; functions: {sorted(FUNCTIONS)}")
        func, lo, hi = FUNCTIONS[name]
        self.expect("(")
        self._enter()
        args = [self.sum()]
        while self.peek() == ("op", ","):
            self.take()
            args.append(self.sum())
        self.expect(")")
        self.depth -= 1
        if not lo <= len(args) <= hi:
            raise CalcError(f"{name}() takes {lo if lo == hi else f'{lo} to {hi}'} argument(s), got {len(args)}")
        if name == "round" and len(args) == 2:
            args[1] = int(args[1])
        return func(*args)

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise CalcError(f"expression nested deeper than {MAX_DEPTH} levels")


def _pow(base: float | int, exponent: float | int) -> float | int:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if abs(base) > 1 and exponent * max(1, abs(base).bit_length() - 1) > MAX_BITS:
            raise CalcError(f"the result would have more than {MAX_BITS} bits")
        return base ** exponent
    if base == 0 and exponent < 0:
        raise CalcError("zero cannot be raised to a negative power")
    result = base ** exponent
    if isinstance(result, complex):
        raise CalcError("the result is a complex number (negative base with a fractional exponent)")
    return result


def _show(kind: str, value: object) -> str:
    return "the end of the expression" if kind == "end" else repr(value)


def evaluate(expression: str) -> float | int:
    try:
        return Parser(expression).parse()
    except OverflowError:
        raise CalcError("the result is too large for a floating point number") from None
    except ValueError as exc:
        if isinstance(exc, CalcError):
            raise
        raise CalcError(f"math domain error: {exc}") from None


def run(args: dict) -> dict:
    value = evaluate(args["expression"])
    if isinstance(value, float) and not math.isfinite(value):
        raise CalcError("the result is not a finite number")
    if isinstance(value, int) and value.bit_length() > 53:
        return {"expression": args["expression"], "value": str(value), "exact_integer": True}
    return {"expression": args["expression"], "value": value}
