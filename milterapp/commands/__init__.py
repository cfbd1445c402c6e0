"""Commands of the ``milterapp`` command line that are more than a few lines of
:mod:`milterapp.cli`, each in its own module: :mod:`milterapp.commands.chain`
(``milterapp chain``)."""

from milterapp.commands.chain import ChainedMilter, MacroCondition, chain_app, parse_milter

__all__ = ["ChainedMilter", "MacroCondition", "chain_app", "parse_milter"]
