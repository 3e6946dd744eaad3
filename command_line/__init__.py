"""The ``dials.cnn_*`` commands, one module each (phil scope + ``run(args=None)``)."""


def modified_parameters(phil_scope, params):
    """The command's parameters that differ from their defaults, as DIALS logs them.

    Taken from the command's own scope: the parser's ``diff_phil`` re-reads every experiment list on
    the command line (twice in DIALS 3.12), which for a run of a few hundred stills costs more than
    classifying them.
    """
    return phil_scope.fetch_diff(source=phil_scope.format(python_object=params)).as_str()
