"""Blind rating: unique (prompt, reply) pairs of a sheet, shuffled, without the mode.
  python blind.py make SHEET BLIND      -> BLIND: id<TAB>prompt<TAB>reply
  python blind.py merge SHEET RATED OUT -> OUT: the sheet with sensible/specific filled
RATED lines: id<TAB>sensible<TAB>specific (1/0)."""
import random, sys
def rows(path):
    lines = open(path, encoding="utf-8").read().splitlines()
    return lines[0], [l.split("\t") for l in lines[1:]]
cmd = sys.argv[1]
header, sheet = rows(sys.argv[2])
pairs = sorted({(r[0], r[2]) for r in sheet})
random.Random(7).shuffle(pairs)
if cmd == "make":
    with open(sys.argv[3], "w", encoding="utf-8") as f:
        for i, (p, r) in enumerate(pairs):
            f.write(f"{i}\t{p}\t{r}\n")
else:
    rated = {}
    for line in open(sys.argv[3], encoding="utf-8").read().splitlines():
        if not line.strip(): continue
        i, sen, spe = line.split("\t")[:3]
        rated[pairs[int(i)]] = (sen, spe)
    with open(sys.argv[4], "w", encoding="utf-8") as f:
        f.write(header + "\n")
        for r in sheet:
            sen, spe = rated[(r[0], r[2])]
            f.write("\t".join([r[0], r[1], r[2], sen, spe]) + "\n")
