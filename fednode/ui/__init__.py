"""UI layer: rich views of fednode's state. Each view is a pure function of a frozen snapshot, so
a test renders it to a fixed-width string console and compares the text. Top tier, with ``cli``
and ``scenario``: may use every layer below."""
