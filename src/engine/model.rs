//! The model behind one interface: the plain-Rust CPU path ([`super::cpu`]) or candle on a
//! GPU ([`super::llama`]).

use std::io::{Read, Seek};

use candle_core::Device;

use super::cpu::{CpuCache, CpuLlama, CpuSegment};
use super::gguf::{GgufFile, ModelSpec};
use super::llama::{KvCache as DeviceCache, Llama};
use super::EngineError;

pub enum Model {
    Cpu(CpuLlama),
    Device(Llama),
}

/// One sequence's part of a batched step: `tokens` to run after what `cache` holds.
pub struct Segment<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// One sequence's attention state.
pub enum KvCache {
    Cpu(CpuCache),
    Device(DeviceCache),
}

impl KvCache {
    pub fn len(&self) -> usize {
        match self {
            KvCache::Cpu(c) => c.len,
            KvCache::Device(c) => c.len(),
        }
    }

    pub fn capacity(&self) -> usize {
        match self {
            KvCache::Cpu(c) => c.capacity,
            KvCache::Device(c) => c.capacity(),
        }
    }

    /// Memory it holds, in bytes.
    pub fn bytes(&self) -> usize {
        match self {
            KvCache::Cpu(c) => c.bytes(),
            KvCache::Device(c) => c.bytes(),
        }
    }

    /// Whether a later turn can continue from it ([`Model::reuse_cache`]); the GPU path
    /// does not keep caches between turns yet.
    pub fn reusable(&self) -> bool {
        matches!(self, KvCache::Cpu(_))
    }
}

impl Model {
    /// `threads`: CPU threads for the matrix products (CPU path only); `context`: the most
    /// positions a sequence will hold, when less than the model's own length.
    pub fn load<R: Read + Seek>(
        file: &GgufFile,
        reader: &mut R,
        device: &Device,
        threads: usize,
        context: Option<usize>,
    ) -> Result<Model, EngineError> {
        if device.is_cpu() {
            Ok(Model::Cpu(CpuLlama::load(file, threads, context)?))
        } else {
            Ok(Model::Device(Llama::load(file, reader, device)?))
        }
    }

    pub fn spec(&self) -> &ModelSpec {
        match self {
            Model::Cpu(m) => &m.spec,
            Model::Device(m) => &m.spec,
        }
    }

    pub fn new_cache(&self, capacity: usize) -> Result<KvCache, EngineError> {
        match self {
            Model::Cpu(m) => Ok(KvCache::Cpu(m.new_cache(capacity))),
            Model::Device(m) => Ok(KvCache::Device(m.new_cache(capacity)?)),
        }
    }

    /// `old`'s first `keep` positions, in a cache of at least `capacity` positions: the
    /// same memory when it is big enough, else a bigger copy. `None` where the model cannot
    /// continue a kept cache (the GPU path).
    pub fn reuse_cache(&self, old: KvCache, keep: usize, capacity: usize) -> Option<KvCache> {
        match (self, old) {
            (Model::Cpu(m), KvCache::Cpu(c)) => {
                Some(KvCache::Cpu(m.reuse_cache(c, keep, capacity)))
            }
            _ => None,
        }
    }

    /// Runs `tokens` after what `cache` holds and returns the last position's logits.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>, EngineError> {
        self.forward_batch(&mut [Segment { tokens, cache }])?
            .pop()
            .ok_or_else(|| EngineError::Model("the model returned no logits".into()))
    }

    /// One step for several sequences: each segment's tokens run after what its cache
    /// holds; returns each segment's last-position logits, in order. On the CPU this is
    /// one batched pass ([`CpuLlama::forward_batch`]); the GPU path runs the segments one
    /// after another.
    pub fn forward_batch(&self, segs: &mut [Segment<'_>]) -> Result<Vec<Vec<f32>>, EngineError> {
        // Checked here once for both models, which assume non-empty chunks that fit.
        for seg in segs.iter() {
            if seg.tokens.is_empty() {
                return Err(EngineError::Model(
                    "forward needs at least one token".into(),
                ));
            }
            if seg.cache.len() + seg.tokens.len() > seg.cache.capacity() {
                return Err(EngineError::ContextFull {
                    capacity: seg.cache.capacity(),
                });
            }
        }
        let foreign = || EngineError::Model("cache belongs to another model".into());
        match self {
            Model::Cpu(m) => {
                let mut cpu = Vec::with_capacity(segs.len());
                for seg in segs.iter_mut() {
                    match &mut *seg.cache {
                        KvCache::Cpu(cache) => cpu.push(CpuSegment {
                            tokens: seg.tokens,
                            cache,
                        }),
                        KvCache::Device(_) => return Err(foreign()),
                    }
                }
                m.forward_batch(&mut cpu)
            }
            Model::Device(m) => segs
                .iter_mut()
                .map(|seg| match &mut *seg.cache {
                    KvCache::Device(cache) => m.forward(seg.tokens, cache),
                    KvCache::Cpu(_) => Err(foreign()),
                })
                .collect(),
        }
    }
}
