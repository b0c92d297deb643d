"""Exception types of onnxqat. The CLI turns an OnnxqatError into one line and exit code 1."""


class OnnxqatError(Exception):
    """A problem with the user's input or configuration (no traceback shown by the CLI)."""


class ModelError(OnnxqatError):
    """A missing, unreadable or malformed model, or one the passes cannot handle."""


class RecipeError(OnnxqatError):
    """An unknown recipe, an unknown key, or a value of the wrong type or range."""


class DataError(OnnxqatError):
    """Missing or malformed data files, labels out of range, shapes that do not match."""


class TrainingError(OnnxqatError):
    """Training cannot go on (a loss that turned NaN, no trainable parameter)."""


class FuseError(OnnxqatError):
    """A graph fuse cannot turn into an integer-only one; the message names the node."""


class OpLibraryError(OnnxqatError):
    """The compiled quantizer op library is missing or cannot be loaded."""
