"""Pure-Python Philox4x32-10 (Salmon et al. 2011), written from the paper for gradmap's tests:
reproduces the draws gradmap makes (uniform, normal, below) without using its code."""
import math

M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
MASK = 0xFFFFFFFF
STREAMS = {"image": 1, "weights": 2, "voxel": 3, "fmri_noise": 4, "meg_noise": 5, "design": 6,
           "sensor": 7, "permutation": 8, "bootstrap": 9, "projection": 10, "augmentation": 11,
           "folds": 12, "labels": 13}


def block(ctr, key):
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = M0 * c0, M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK, p1 & MASK, ((p0 >> 32) ^ c3 ^ k1) & MASK, p0 & MASK
        k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
    return [c0, c1, c2, c3]


class Philox:
    def __init__(self, seed, stream, a=0, b=0):
        self.key = (seed & MASK, (seed >> 32) & MASK)
        self.ctr = [STREAMS[stream], a & MASK, b & MASK, 0]
        self.buf, self.pos, self.spare = [], 4, None

    def u32(self):
        if self.pos == 4:
            self.buf = block(self.ctr, self.key)
            self.ctr[3] = (self.ctr[3] + 1) & MASK
            self.pos = 0
        self.pos += 1
        return self.buf[self.pos - 1]

    def uniform(self, lo=0.0, hi=1.0):
        h, l = self.u32() >> 5, self.u32() >> 6
        u = (h * 67108864.0 + l) / 9007199254740992.0
        return lo + (hi - lo) * u

    def normal(self):
        if self.spare is not None:
            s, self.spare = self.spare, None
            return s
        u1 = 1.0 - self.uniform()
        u2 = self.uniform()
        r = math.sqrt(-2.0 * math.log(u1))
        self.spare = r * math.sin(2.0 * math.pi * u2)
        return r * math.cos(2.0 * math.pi * u2)

    def below(self, n):
        if n <= 1:
            return 0
        limit = ((1 << 32) - n) % n
        while True:
            m = self.u32() * n
            if (m & MASK) >= limit:
                return m >> 32


assert block([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
assert block([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == \
    [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]
