//! Reads state dicts written by Python's `torch.save` (the zip format of `pytorch_model.bin`):
//! `data.pkl` is unpickled with a small stack machine that understands the opcodes torch uses,
//! tensors are rebuilt from `data/<key>` storages with their offset, size and stride.

use super::ModelError;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use tch::{Kind, Tensor};

#[derive(Debug, Clone)]
enum Value {
    None,
    /// A bool or float: never needed beyond keeping the stack consistent.
    Scalar,
    Int(i64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    Storage {
        key: String,
        kind: Kind,
    },
    Tensor(TensorRef),
    Mark,
    /// Anything else (a call we do not interpret); kept so the stack stays consistent.
    Opaque,
}

#[derive(Debug, Clone)]
struct TensorRef {
    key: String,
    kind: Kind,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    source: &'a str,
}

fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

impl<'a> Unpickler<'a> {
    fn err(&self, message: impl Into<String>) -> ModelError {
        ModelError::Format {
            path: self.source.to_string(),
            message: format!("data.pkl at byte {}: {}", self.pos, message.into()),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ModelError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.data.len())
            .ok_or_else(|| self.err("truncated"))?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, ModelError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, ModelError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn line(&mut self) -> Result<String, ModelError> {
        let start = self.pos;
        let end = self.data[start..]
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| self.err("unterminated line"))?;
        self.pos = start + end + 1;
        Ok(String::from_utf8_lossy(&self.data[start..start + end]).into_owned())
    }

    fn string(&mut self, n: usize) -> Result<Value, ModelError> {
        let bytes = self.take(n)?;
        Ok(Value::Str(String::from_utf8_lossy(bytes).into_owned()))
    }

    fn pop(&mut self) -> Result<Value, ModelError> {
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, ModelError> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or_else(|| self.err("no MARK on the stack"))?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top_mut(&mut self) -> Result<&mut Value, ModelError> {
        let pos = self.pos;
        self.stack.last_mut().ok_or(ModelError::Format {
            path: self.source.to_string(),
            message: format!("data.pkl at byte {pos}: empty stack"),
        })
    }

    fn persistent_load(&self, pid: Value) -> Result<Value, ModelError> {
        let Value::Tuple(items) = pid else {
            return Err(self.err("persistent id is not a tuple"));
        };
        match items.as_slice() {
            [Value::Str(tag), Value::Global(_, storage), Value::Str(key), _location, _numel] if tag == "storage" => {
                let kind =
                    storage_kind(storage).ok_or_else(|| self.err(format!("unsupported storage type {storage}")))?;
                Ok(Value::Storage { key: key.clone(), kind })
            }
            _ => Err(self.err("unsupported persistent id")),
        }
    }

    fn ints(&self, v: &Value) -> Result<Vec<i64>, ModelError> {
        match v {
            Value::Tuple(items) | Value::List(items) => items
                .iter()
                .map(|i| match i {
                    Value::Int(n) => Ok(*n),
                    _ => Err(self.err("expected an integer tuple")),
                })
                .collect(),
            _ => Err(self.err("expected a tuple")),
        }
    }

    fn reduce(&self, callable: Value, args: Value) -> Result<Value, ModelError> {
        let Value::Global(module, name) = &callable else {
            return Ok(Value::Opaque);
        };
        let args = match args {
            Value::Tuple(a) => a,
            _ => return Ok(Value::Opaque),
        };
        match (module.as_str(), name.as_str()) {
            ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
                let [Value::Storage { key, kind }, Value::Int(offset), size, stride, ..] = args.as_slice() else {
                    return Err(self.err("unexpected _rebuild_tensor arguments"));
                };
                Ok(Value::Tensor(TensorRef {
                    key: key.clone(),
                    kind: *kind,
                    offset: *offset,
                    size: self.ints(size)?,
                    stride: self.ints(stride)?,
                }))
            }
            ("torch._utils", "_rebuild_parameter") | ("torch._utils", "_rebuild_parameter_with_state") => {
                Ok(args.into_iter().next().unwrap_or(Value::None))
            }
            ("collections", "OrderedDict") => Ok(Value::Dict(Vec::new())),
            _ => Ok(Value::Opaque),
        }
    }

    fn run(mut self) -> Result<Value, ModelError> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?;
                }
                0x95 => {
                    self.take(8)?;
                }
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Scalar),
                0x89 => self.stack.push(Value::Scalar),
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v.into()))
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v.into()))
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v.into()))
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let bytes = self.take(n)?;
                    if n > 8 {
                        return Err(self.err("integer too large"));
                    }
                    let mut buf = if bytes.last().is_some_and(|b| b & 0x80 != 0) {
                        [0xff; 8]
                    } else {
                        [0; 8]
                    };
                    buf[..n].copy_from_slice(bytes);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)));
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(Value::Scalar);
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                0x8c | b'U' => {
                    let n = self.u8()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(module, name));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.stack.push(Value::Global(m, n)),
                        _ => return Err(self.err("STACK_GLOBAL needs two strings")),
                    }
                }
                b'q' => {
                    let k = self.u8()?.into();
                    let v = self.stack.last().cloned().ok_or_else(|| self.err("empty stack"))?;
                    self.memo.insert(k, v);
                }
                b'r' => {
                    let k = self.u32()?;
                    let v = self.stack.last().cloned().ok_or_else(|| self.err("empty stack"))?;
                    self.memo.insert(k, v);
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    let v = self.stack.last().cloned().ok_or_else(|| self.err("empty stack"))?;
                    self.memo.insert(k, v);
                }
                b'h' | b'j' => {
                    let k = if op == b'h' { self.u8()?.into() } else { self.u32()? };
                    let v = self
                        .memo
                        .get(&k)
                        .cloned()
                        .ok_or_else(|| self.err(format!("memo {k} missing")))?;
                    self.stack.push(v);
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.err("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items));
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.stack.push(v);
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.stack.push(v);
                }
                0x81 => {
                    let args = self.pop()?;
                    let class = self.pop()?;
                    let v = self.reduce(class, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    self.pop()?;
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    if let Value::Dict(d) = self.top_mut()? {
                        d.push((key, value));
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if let Value::Dict(d) = self.top_mut()? {
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                }
                b'a' => {
                    let value = self.pop()?;
                    if let Value::List(l) = self.top_mut()? {
                        l.push(value);
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    if let Value::List(l) = self.top_mut()? {
                        l.extend(items);
                    }
                }
                b'.' => return self.pop(),
                other => return Err(self.err(format!("unsupported pickle opcode 0x{other:02x}"))),
            }
        }
    }
}

/// The tensors of a `torch.save`d state dict (nested `state_dict` / `module` dicts are
/// unwrapped), on the CPU in their stored dtype.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>, ModelError> {
    let source = path.display().to_string();
    let fail = |message: String| ModelError::Format {
        path: source.clone(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| {
        fail(format!(
            "not a torch.save zip archive ({e}); legacy (pre-1.6) pickles are not supported, re-save with a recent torch"
        ))
    })?;
    let pkl_name = (0..archive.len())
        .filter_map(|i| archive.name_for_index(i).map(str::to_string))
        .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
        .ok_or_else(|| fail("no data.pkl inside the archive".into()))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let mut pkl = Vec::new();
    archive
        .by_name(&pkl_name)
        .and_then(|mut f| f.read_to_end(&mut pkl).map_err(Into::into))
        .map_err(|e| fail(format!("cannot read {pkl_name}: {e}")))?;
    let root = Unpickler {
        data: &pkl,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        source: &source,
    }
    .run()?;

    let mut dict = root;
    loop {
        let Value::Dict(entries) = &dict else {
            return Err(fail("the pickle does not hold a state dict".into()));
        };
        let nested = entries.iter().find_map(|(k, v)| match (k, v) {
            (Value::Str(k), Value::Dict(_)) if k == "state_dict" || k == "module" || k == "model" => Some(v.clone()),
            _ => None,
        });
        let has_tensors = entries.iter().any(|(_, v)| matches!(v, Value::Tensor(_)));
        match nested {
            Some(inner) if !has_tensors => dict = inner,
            _ => break,
        }
    }
    let Value::Dict(entries) = dict else {
        unreachable!("checked above")
    };
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    let mut tensors = Vec::new();
    for (key, value) in entries {
        let (Value::Str(name), Value::Tensor(t)) = (key, value) else {
            continue;
        };
        if !storages.contains_key(&t.key) {
            let entry = format!("{prefix}data/{}", t.key);
            let mut bytes = Vec::new();
            archive
                .by_name(&entry)
                .and_then(|mut f| f.read_to_end(&mut bytes).map_err(Into::into))
                .map_err(|e| fail(format!("cannot read storage {entry} for {name}: {e}")))?;
            let element = t.kind.elt_size_in_bytes();
            if bytes.len() % element != 0 {
                return Err(fail(format!("storage {entry} for {name} is truncated")));
            }
            let storage = Tensor::f_from_data_size(&bytes, &[(bytes.len() / element) as i64], t.kind)
                .map_err(|e| fail(format!("storage {entry}: {e}")))?;
            storages.insert(t.key.clone(), storage);
        }
        let storage = &storages[&t.key];
        let needed = t.offset
            + t.size
                .iter()
                .zip(&t.stride)
                .map(|(s, st)| (s - 1).max(0) * st)
                .sum::<i64>()
            + 1;
        if t.size.iter().all(|s| *s > 0) && needed > storage.size()[0] {
            return Err(fail(format!("tensor {name} reaches beyond its storage {}", t.key)));
        }
        let tensor = storage
            .f_as_strided(t.size.as_slice(), t.stride.as_slice(), t.offset)
            .and_then(|v| v.f_contiguous())
            .map_err(|e| fail(format!("tensor {name}: {e}")))?;
        tensors.push((name, tensor));
    }
    Ok(tensors)
}
