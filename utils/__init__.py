"""The lowest layer: helpers every package may import (file writes, rounding); it imports none of them."""
