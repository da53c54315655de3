"""Map the class names found in a user's data onto the model's class names."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def class_index(found: Iterable[str], model_classes: Sequence[str], where: str) -> dict[str, int]:
    """Each class name found in the data -> its index among the model's classes.

    Parameters
    ----------
    found : iterable of str
        Class names of the data (folder names, manifest labels).
    model_classes : sequence of str
        The archive's class names, in logit order.
    where : str
        Names the data in the error (the --data spec).

    Raises
    ------
    ValueError
        Some names are not classes of the model: lists those unknown names and the model's
        classes that the data lacks.
    """
    index = {name: i for i, name in enumerate(model_classes)}
    found = set(found)
    unknown = sorted(found - index.keys())
    if unknown:
        missing = [name for name in model_classes if name not in found]
        raise ValueError(f"{where}: {len(unknown)} classes are not classes of the model: {unknown}; "
                         f"the model's classes the data lacks: {missing}. Class folders and labels "
                         f"must be spelt as the archive's class names")
    return {name: index[name] for name in found}


def label_index(label, model_classes: Sequence[str], where: str) -> int:
    """A manifest label -> class index: a class name, else an integer index into the model's classes.

    Raises
    ------
    ValueError
        A name that is no class of the model, or an index outside [0, C).
    """
    if isinstance(label, str) and label in model_classes:
        return list(model_classes).index(label)
    if isinstance(label, int) or (isinstance(label, str) and label.strip().isdigit()):
        value = int(label)
        if not 0 <= value < len(model_classes):
            raise ValueError(f"{where}: label {value} is outside the model's class indices [0, {len(model_classes) - 1}]")
        return value
    raise ValueError(f"{where}: label {label!r} is not a class of the model ({list(model_classes)}) nor a class index")
