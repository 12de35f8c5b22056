"""Built-in tools: a calculator and a Python interpreter (book ch.13: Toolformer's calculator, and code
execution, "the tool is an interpreter").

- ``calculator``: one arithmetic expression (``+ - * / // % **``, unary minus, parentheses, integers
  and floats), read with :mod:`ast` and computed node by node, never ``eval``; integer results are
  exact, floats printed with ``repr``. Numbers are kept to :data:`MAX_INTEGER_BITS` bits, so
  ``9**9**9`` is refused at once instead of running for hours.
- ``python``: a program run in the code sandbox (:mod:`rlhf_core.rewards.sandbox`, bubblewrap, the
  same as the ``code_tests`` verifier's); the model reads its stdout, and on failure the tail of its
  stderr. Options: ``sandbox`` (``bubblewrap`` | ``none``), ``timeout_seconds``, ``memory_mb``.

``builtin_tool(name, **options)`` builds one; unknown names and options are UserErrors.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlhf_core.environments.tools import Tool, ToolError
from rlhf_core.errors import UserError
from rlhf_core.rewards.sandbox import INSTALL_HINT, SandboxLimits, available_sandbox, run_python

MAX_INTEGER_BITS = 10_000  # about 3,000 decimal digits: under Python's 4,300-digit str() limit
MAX_EXPRESSION_CHARS = 2_000
_STDERR_TAIL_CHARS = 1_500

_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[float], float]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


# --- calculator -------------------------------------------------------------------------------------


def calculate(expression: str) -> str:
    """The value of an arithmetic expression, as text; a ToolError says why it has none."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ToolError(f"{expression[:80]!r} is not an arithmetic expression") from None
    try:
        value = _evaluate(tree.body)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError("the result is too large") from None
    except RecursionError:
        raise ToolError("the expression is nested too deeply") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("the result is too large (not a finite number)")
    return repr(value)


def _evaluate(node: ast.expr) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        _refuse_huge(node.op, left, right)
        result = _BINARY[type(node.op)](left, right)
        if isinstance(result, complex):
            raise ToolError("the result is not a real number (a negative number to a fractional power)")
        return _checked(result)
    raise ToolError(
        f"{ast.unparse(node)[:80]!r} is not allowed: "
        "use numbers, + - * / // % **, unary minus and parentheses"
    )


def _refuse_huge(op: ast.operator, left: float, right: float) -> None:
    """Refuse an integer product or power whose result would exceed MAX_INTEGER_BITS, before computing
    it (``9**9**9`` would otherwise run for hours)."""
    if not (isinstance(left, int) and isinstance(right, int)):
        return
    if isinstance(op, ast.Mult):
        bits = left.bit_length() + right.bit_length()
    elif isinstance(op, ast.Pow) and right > 0 and abs(left) > 1:
        bits = (abs(left).bit_length() - 1) * right  # a lower bound of the result's size
    else:
        return
    if bits > MAX_INTEGER_BITS + 1:
        raise ToolError(f"the result is too large (more than {MAX_INTEGER_BITS} bits)")


def _checked(value: int | float) -> int | float:
    if isinstance(value, int) and value.bit_length() > MAX_INTEGER_BITS:
        raise ToolError(f"the result is too large (more than {MAX_INTEGER_BITS} bits)")
    return value


def calculator_tool() -> Tool:
    return Tool(
        name="calculator",
        description="Evaluate an arithmetic expression with + - * / // % ** and parentheses; "
        "integers are exact.",
        parameters={
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "For example (17 + 5) * 3 ** 2"}},
            "required": ["expression"],
            "additionalProperties": False,
        },
        function=calculate,
    )


# --- python -----------------------------------------------------------------------------------------


class PythonToolOptions(BaseModel):
    """Options of the ``python`` tool."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sandbox: Literal["bubblewrap", "none"] = Field(
        "bubblewrap",
        description="'bubblewrap' isolates each run (see rlhf_core.rewards.sandbox); 'none' runs the "
        "code as a plain subprocess with limits only: it can read and write your files and use the network.",
    )
    timeout_seconds: float = Field(10.0, gt=0, le=300, description="Wall-clock limit per run (seconds).")
    memory_mb: int = Field(512, ge=64, le=65536, description="Address-space limit of the program (MiB).")


def python_tool(options: PythonToolOptions) -> Tool:
    """The ``python`` tool under ``options``; with ``sandbox: bubblewrap``, a UserError when it is missing."""
    if options.sandbox == "bubblewrap" and not available_sandbox():
        raise UserError(f"python tool (option `sandbox: bubblewrap`): {INSTALL_HINT}")
    limits = SandboxLimits(wall_seconds=options.timeout_seconds, memory_mb=options.memory_mb)

    def run_code(code: str) -> str:
        result = run_python(code, limits=limits, sandbox=options.sandbox == "bubblewrap")
        parts = [result.stdout]
        if result.timed_out:
            parts.append(f"[timed out after {options.timeout_seconds:g} s]")
        elif result.output_truncated:
            parts.append(f"[killed: more than {limits.max_output_bytes} bytes of output]")
        elif result.returncode != 0:
            parts.append(f"[exit status {result.returncode}]\n{result.stderr[-_STDERR_TAIL_CHARS:]}")
        text = "\n".join(part.rstrip("\n") for part in parts if part)
        return text or "(no output: print what you want to see)"

    return Tool(
        name="python",
        description="Run a Python program (standard library only, no network, no files kept) and read "
        "what it prints.",
        parameters={
            "type": "object",
            "properties": {"code": {"type": "string", "description": "A Python program; print the results."}},
            "required": ["code"],
            "additionalProperties": False,
        },
        function=run_code,
    )


# --- registry ---------------------------------------------------------------------------------------


def _calculator(options: dict) -> Tool:
    if options:
        raise UserError(f"built-in tool 'calculator' takes no options, got {', '.join(sorted(options))}")
    return calculator_tool()


def _python(options: dict) -> Tool:
    try:
        parsed = PythonToolOptions(**options)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise UserError(f"built-in tool 'python': invalid options: {problems}") from None
    return python_tool(parsed)


_BUILDERS: dict[str, Callable[[dict], Tool]] = {"calculator": _calculator, "python": _python}
BUILTIN_TOOLS: tuple[str, ...] = tuple(_BUILDERS)


def builtin_tool(name: str, **options: object) -> Tool:
    """The built-in tool ``name`` with its options; a UserError for an unknown name or option."""
    if name not in _BUILDERS:
        raise UserError(f"unknown built-in tool {name!r} (built-in tools: {', '.join(BUILTIN_TOOLS)})")
    return _BUILDERS[name](options)
