"""A kind's own options: a kind may declare them as a NamedTuple class attribute `Options` (with defaults) and
check them in `check_options(options, env_config)`; the environment config carries the values given as
`kind_options`, sorted (name, value) pairs, so that it stays hashable."""
from agmc_jax.errors import BudgetError


def option_names(kind) -> tuple:
    """The names of the options `kind` (a kind class or instance) takes; () for a kind without `Options`."""
    options = getattr(kind, "Options", None)
    return () if options is None else tuple(options._fields)


def options_of(kind, config):
    """The kind's `Options` from `config.kind_options`, defaults filled in and checked (None for a kind without
    `Options`); a name the kind does not take is one `BudgetError` listing the ones it does."""
    given = dict(config.kind_options)
    names = option_names(kind)
    unknown = sorted(set(given) - set(names))
    if unknown:
        takes = f"its options are {', '.join(names)}" if names else "it takes none"
        raise BudgetError(f"the {kind.unit} kind has no option {', '.join(unknown)}; {takes}")
    if not names:
        return None
    options = kind.Options(**given)
    check = getattr(kind, "check_options", None)
    if check is not None:
        check(options, config)
    return options
