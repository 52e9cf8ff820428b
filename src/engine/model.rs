//! The model behind one interface: the plain-Rust CPU path ([`super::cpu`]) or candle on a
//! GPU ([`super::llama`]).

use std::io::{Read, Seek};

use candle_core::Device;

use super::cpu::{CpuCache, CpuLlama};
use super::gguf::{GgufFile, ModelSpec};
use super::llama::{KvCache as DeviceCache, Llama};
use super::EngineError;

pub enum Model {
    Cpu(CpuLlama),
    Device(Llama),
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

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    /// `threads`: CPU threads for the matrix products (CPU path only).
    pub fn load<R: Read + Seek>(
        file: &GgufFile,
        reader: &mut R,
        device: &Device,
        threads: usize,
    ) -> Result<Model, EngineError> {
        if device.is_cpu() {
            Ok(Model::Cpu(CpuLlama::load(file, reader, threads)?))
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
        // Checked here once for both models, which assume a non-empty chunk that fits.
        if tokens.is_empty() {
            return Err(EngineError::Model(
                "forward needs at least one token".into(),
            ));
        }
        if cache.len() + tokens.len() > cache.capacity() {
            return Err(EngineError::ContextFull {
                capacity: cache.capacity(),
            });
        }
        match (self, cache) {
            (Model::Cpu(m), KvCache::Cpu(c)) => m.forward(tokens, c),
            (Model::Device(m), KvCache::Device(c)) => m.forward(tokens, c),
            _ => Err(EngineError::Model("cache belongs to another model".into())),
        }
    }
}
