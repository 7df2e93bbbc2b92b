//! The generator states of libtorch restored through the shim repeat the same draws. A test
//! binary of its own: libtorch's default generators are global, and the library's unit tests
//! draw from them concurrently.

use kormlm_worker::train::rng_state::{get_state, set_state, Generator, RngStates};
use tch::{Device, Kind, Tensor};

#[test]
fn restored_generators_repeat_the_same_draws_and_dropout_masks() {
    tch::manual_seed(11);
    let saved = RngStates::capture(Device::Cpu).unwrap();
    assert!(saved.cuda.is_none());
    let first = Tensor::rand([64], (Kind::Float, Device::Cpu));
    let ones = Tensor::ones([4096], (Kind::Float, Device::Cpu));
    let mask = ones.dropout(0.1, true);
    assert_ne!(mask, ones, "dropout zeroed something");
    // The draws moved the state on.
    assert_ne!(RngStates::capture(Device::Cpu).unwrap(), saved);
    saved.restore(Device::Cpu).unwrap();
    assert_eq!(Tensor::rand([64], (Kind::Float, Device::Cpu)), first);
    assert_eq!(ones.dropout(0.1, true), mask);

    if tch::Cuda::is_available() {
        let device = Device::Cuda(0);
        let saved = RngStates::capture(device).unwrap();
        let cuda = saved.cuda.clone().expect("a CUDA state on a GPU");
        let first = Tensor::rand([64], (Kind::Float, device));
        let mask = Tensor::ones([4096], (Kind::Float, device)).dropout(0.1, true);
        assert_ne!(get_state(Generator::Cuda(0)).unwrap(), cuda);
        saved.restore(device).unwrap();
        assert_eq!(Tensor::rand([64], (Kind::Float, device)), first);
        assert_eq!(Tensor::ones([4096], (Kind::Float, device)).dropout(0.1, true), mask);
        eprintln!("CUDA generator state: {} bytes, restored draws equal", cuda.len());
    } else {
        let err = get_state(Generator::Cuda(0)).unwrap_err().to_string();
        assert!(err.starts_with("the CUDA:0 random generator: "), "{err}");
        assert!(set_state(Generator::Cuda(0), &[0; 16]).is_err());
    }
}
