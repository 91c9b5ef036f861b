//! Every fuzz target over its seed corpus (`corpus/<target>/`, which also keeps each
//! input a fuzzer found to crash, as a regression) and a few thousand deterministic
//! mutations of it: flips, cuts, splices and repeats. Not coverage-guided (that is
//! `cargo +nightly fuzz run`), but on stable and quick enough for every CI run.

use std::path::Path;

/// Mutations per seed; `BERTH_FUZZ_REPLAY_ROUNDS` for more.
fn rounds() -> usize {
    std::env::var("BERTH_FUZZ_REPLAY_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

/// xorshift64*: a fixed sequence, so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutation of `seed`, with `other` for splices.
fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = [0, 0xff, b'"', b'/', b'\n', b':', b'=', b'@'][rng.below(8)];
            }
            2 => v.truncate(rng.below(v.len() + 1)),
            3 if !other.is_empty() => {
                let (at, from) = (rng.below(v.len() + 1), rng.below(other.len()));
                let piece = &other[from..(from + 1 + rng.below(64)).min(other.len())];
                v.splice(at..at, piece.iter().copied());
            }
            4 if !v.is_empty() => {
                let (from, len) = (rng.below(v.len()), 1 + rng.below(16));
                let piece: Vec<u8> = v[from..(from + len).min(v.len())].to_vec();
                for _ in 0..1 + rng.below(8) {
                    v.extend_from_slice(&piece);
                }
            }
            _ => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next() as u8);
            }
        }
    }
    v
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    out.sort(); // read_dir's order is the filesystem's: sorted, a failure replays anywhere
    out.push(Vec::new());
    out
}

#[test]
fn every_target_survives_its_corpus_and_mutations() {
    for (name, target) in berth_fuzz::TARGETS {
        let seeds = seeds(name);
        assert!(seeds.len() > 1, "no seeds for {name} in corpus/{name}/");
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
        let mut runs = 0;
        for (i, seed) in seeds.iter().enumerate() {
            target(seed);
            let other = &seeds[(i + 1) % seeds.len()];
            for _ in 0..rounds() {
                target(&mutate(&mut rng, seed, other));
                runs += 1;
            }
        }
        println!("{name}: {} seeds, {runs} mutations", seeds.len());
    }
}
