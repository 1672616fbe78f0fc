"""fxopt's exception types."""


class FxoptError(RuntimeError):
    """A rewrite, pass or kernel failed and `strict` asked for an error instead of a fallback."""
