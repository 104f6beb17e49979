"""A line chart as PNG bytes, and a sparkline for the terminal, with no dependency (zlib + struct).

The loss curve is the first thing people look at after a run, so it must not wait for an extra
install: a white canvas, axes with round-number ticks, one line per series (dashed with dots for
validation), a legend, and a 3×5 pixel font for the labels. PNG is written as one IDAT of
unfiltered RGB rows, which every reader accepts.
"""

import math
import struct
import zlib
from dataclasses import dataclass, replace

WIDTH, HEIGHT = 800, 500
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 20, 50  # margins around the plot area, in pixels
SCALE = 2  # pixels per font dot: 3×5 glyphs drawn 6×10
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
INK, GRID, WHITE = (0, 0, 0), (225, 225, 225), (255, 255, 255)
BLOCKS = "▁▂▃▄▅▆▇█"
# Each glyph is five rows of three dots, one octal digit a row: 4 is the left dot, 1 the right.
GLYPHS = "0123456789abcdefghijklmnopqrstuvwxyz.-_/: +?"
ROWS = (
    "75557 26227 71747 71317 55711 74717 74757 71122 75757 75717 25755 65656 34443 65556 74647 "
    "74644 34553 55755 72227 11152 55655 44447 57755 65555 25552 65644 25563 65655 34216 72222 "
    "55557 55552 55775 55255 55222 71247 00002 00700 00007 11244 02020 00000 02720 71302 "
)
FONT = {c: tuple(int(d) for d in rows) for c, rows in zip(GLYPHS, ROWS.split())}


@dataclass
class Series:
    label: str
    points: list[tuple[float, float]]  # (x, y)
    color: int  # index into COLORS
    dashed: bool = False  # validation: dashed, with a dot on each point


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round values (1, 2 or 5 × 10^k apart) covering [lo, hi] with about `count` ticks."""
    raw = (hi - lo) / max(count, 1) or 1.0
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    count = max(1, math.ceil((hi - first) / step - 1e-9))  # two ticks at least, even for one value
    return [round(first + i * step, 12) for i in range(count + 1)]


def tick_label(value: float) -> str:
    return f"{value:g}"


class Canvas:
    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.pixels = bytearray(WHITE * (width * height))

    def dot(self, x: int, y: int, color: tuple[int, int, int], size: int = 1) -> None:
        for yy in range(y, y + size):
            for xx in range(x, x + size):
                if 0 <= xx < self.width and 0 <= yy < self.height:
                    i = 3 * (yy * self.width + xx)
                    self.pixels[i : i + 3] = bytes(color)

    def line(self, a: tuple[int, int], b: tuple[int, int], color, size: int = 2, dash: int = 0) -> None:
        """Bresenham's line, `size` pixels thick; with `dash`, drawn `dash` pixels on, `dash` off."""
        (x0, y0), (x1, y1) = a, b
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err, n = dx + dy, 0
        while True:
            if not dash or (n // dash) % 2 == 0:
                self.dot(x0, y0, color, size)
            if (x0, y0) == (x1, y1):
                return
            n, e2 = n + 1, 2 * err
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def text(self, x: int, y: int, text: str, color=INK) -> None:
        for k, char in enumerate(text.lower()):
            for row, bits in enumerate(FONT.get(char, FONT["?"])):
                for col in range(3):
                    if bits & (4 >> col):
                        self.dot(x + (4 * k + col) * SCALE, y + row * SCALE, color, SCALE)

    def png(self) -> bytes:
        rows = b"".join(
            b"\x00" + bytes(self.pixels[3 * self.width * y : 3 * self.width * (y + 1)]) for y in range(self.height)
        )
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (
            b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows, 9)) + _chunk(b"IEND")
        )


def _chunk(kind: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def text_width(text: str) -> int:
    return 4 * SCALE * len(text) - SCALE


def line_chart(series: list[Series], x_label: str, y_label: str) -> bytes:
    """Every series on one pair of axes scaled to fit them all; NaN and infinite points are left out."""
    canvas = Canvas(WIDTH, HEIGHT)
    series = [replace(s, points=[(x, y) for x, y in s.points if math.isfinite(y)]) for s in series]
    xs = [x for s in series for x, _ in s.points] or [0.0, 1.0]
    ys = [y for s in series for _, y in s.points] or [0.0, 1.0]
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    right, bottom = WIDTH - RIGHT, HEIGHT - BOTTOM

    def at(x: float, y: float) -> tuple[int, int]:
        return (
            round(LEFT + (x - x0) / (x1 - x0) * (right - LEFT)),
            round(bottom - (y - y0) / (y1 - y0) * (bottom - TOP)),
        )

    for tick in x_ticks:
        px, _ = at(tick, y0)
        canvas.line((px, TOP), (px, bottom), GRID, size=1)
        canvas.text(px - text_width(tick_label(tick)) // 2, bottom + 8, tick_label(tick))
    for tick in y_ticks:
        _, py = at(x0, tick)
        canvas.line((LEFT, py), (right, py), GRID, size=1)
        canvas.text(LEFT - 8 - text_width(tick_label(tick)), py - 5, tick_label(tick))
    canvas.line((LEFT, TOP), (LEFT, bottom), INK, size=1)
    canvas.line((LEFT, bottom), (right, bottom), INK, size=1)
    canvas.text((LEFT + right - text_width(x_label)) // 2, bottom + 28, x_label)
    canvas.text(4, TOP, y_label)
    for s in series:
        color, points = COLORS[s.color % len(COLORS)], [at(x, y) for x, y in s.points]
        for a, b in zip(points, points[1:]):
            canvas.line(a, b, color, dash=6 if s.dashed else 0)
        for p in points if s.dashed or len(points) == 1 else []:  # a lone point would not show
            canvas.dot(p[0] - 3, p[1] - 3, color, size=7)
    _legend(canvas, series, right)
    return canvas.png()


def _legend(canvas: Canvas, series: list[Series], right: int) -> None:
    widest = max((text_width(s.label) for s in series), default=0)
    left = right - widest - 46
    for i, s in enumerate(series):
        y = TOP + 10 + 18 * i
        canvas.line((left, y + 4), (left + 24, y + 4), COLORS[s.color % len(COLORS)], dash=6 if s.dashed else 0)
        canvas.text(left + 32, y, s.label)


def sparkline(values: list[float], width: int = 40) -> str:
    """'█▆▅▃▂▂▁': `values` averaged into at most `width` buckets, lowest ▁, highest █."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return ""
    buckets = min(width, len(values))
    means = [
        sum(chunk) / len(chunk)
        for i in range(buckets)
        if (chunk := values[i * len(values) // buckets : (i + 1) * len(values) // buckets])
    ]
    lo, hi = min(means), max(means)
    return "".join(BLOCKS[round((m - lo) / (hi - lo) * (len(BLOCKS) - 1)) if hi > lo else 0] for m in means)
