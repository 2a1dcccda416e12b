"""A kind's own options: a kind may declare them as a NamedTuple class attribute `Options` (with defaults) and
check them in `check_options(options, env_config)`; the environment config carries the values given as
`kind_options`, sorted (name, value) pairs, so that it stays hashable. The command line gives them as strings
(`--kind-option min_bit=3`), read as the types `Options` declares."""
import typing

from agmc_jax.errors import BudgetError


def parse_value(text: str, annotation, default):
    """A command-line string as the type of a config field (int, float, bool, optional); `ValueError` if it is not."""
    kinds = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if text.lower() == "none" and type(None) in typing.get_args(annotation):
        return None
    kind = kinds[0] if isinstance(kinds[0], type) else type(default)
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(text)
        return text.lower() in ("true", "1")
    return kind(text)


def option_names(kind) -> tuple:
    """The names of the options `kind` (a kind class or instance) takes; () for a kind without `Options`."""
    options = getattr(kind, "Options", None)
    return () if options is None else tuple(options._fields)


def type_words(annotation) -> str:
    """A field's type as a user reads it: 'an int', 'an int or none'."""
    names = [getattr(a, "__name__", str(a)) for a in typing.get_args(annotation) or (annotation,) if a is not type(None)]
    optional = type(None) in typing.get_args(annotation)
    words = " or ".join(f"{'an' if n[0] in 'aeiou' else 'a'} {n}" for n in names)
    return words + (" or none" if optional else "")


def typed_options(kind, given) -> dict:
    """The kind options `given` (a mapping; command-line strings read as the types its `Options` declares); a name
    the kind does not take or a value of the wrong type is one `BudgetError`."""
    names = option_names(kind)
    unknown = sorted(set(given) - set(names))
    if unknown:
        takes = f"its options are {', '.join(names)}" if names else "it takes none"
        raise BudgetError(f"the {kind.unit} kind has no option {', '.join(unknown)}; {takes}")
    hints = typing.get_type_hints(kind.Options) if names else {}
    typed = {}
    for name, value in given.items():
        if isinstance(value, str):
            try:
                value = parse_value(value, hints[name], kind.Options._field_defaults.get(name))
            except ValueError:
                raise BudgetError(f"the {kind.unit} kind's option {name} takes {type_words(hints[name])}, got "
                                  f"{value!r}") from None
        typed[name] = value
    return typed


def options_of(kind, config):
    """The kind's `Options` from `config.kind_options`, defaults filled in and checked (None for a kind without
    `Options`); a name the kind does not take is one `BudgetError` listing the ones it does."""
    given = typed_options(kind, dict(config.kind_options))
    if not option_names(kind):
        return None
    options = kind.Options(**given)
    check = getattr(kind, "check_options", None)
    if check is not None:
        check(options, config)
    return options
