//! The vCPU run loop on real KVM, with tiny guests instead of a kernel:
//! PIO exits reach the bus, instructions the host cannot emulate are stepped
//! over or executed by husk-vmm (on PVM hosts: `fwait`, `popcnt`, XSAVE and
//! XRSTOR) or run natively (on hardware), the faults they must raise are
//! raised, and an instruction nobody handles stops the vCPU with an error
//! naming its bytes and RIP.

use std::{
    sync::{mpsc::channel, Arc, Mutex},
    time::Duration,
};

use husk_vmm_core::{
    arch::cpuid::CpuProfile,
    bus::{Bus, BusDevice},
    memory::{create_guest_memory, GuestMemory},
    vstate::{
        control::{install_kick_handler, kick_signal, RunState, VcpuControl, Wanted},
        vcpu::{Vcpu, VcpuExit},
        vm::{create_vm, open_kvm},
    },
};
use vm_memory::{Bytes, GuestAddress};

const CODE_AT: u64 = 0x1000;
const DONE_PORT: u64 = 0xf4;

/// Records the byte written to the "done" port and stops the vCPU.
struct Done {
    control: Arc<VcpuControl>,
    value: Arc<Mutex<Option<u8>>>,
}

impl BusDevice for Done {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        *self.value.lock().expect("lock") = data.first().copied();
        self.control.request(Wanted::Stop);
    }
}

fn require_kvm() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: these tests need KVM and do not skip"
    );
}

/// Runs `code` in 32-bit protected mode (the PVH entry state) until it
/// writes to the done port or the vCPU stops. Returns the exit and the byte.
fn run_code(code: &[u8]) -> (VcpuExit, Option<u8>) {
    let (exit, value, _mem) = run_code_with(code, &[]);
    (exit, value)
}

/// [`run_code`] with `data` written into guest memory first (address,
/// bytes); also returns the guest memory as the code left it.
fn run_code_with(code: &[u8], data: &[(u64, &[u8])]) -> (VcpuExit, Option<u8>, GuestMemory) {
    require_kvm();
    let kvm = open_kvm(std::path::Path::new("/dev/kvm")).expect("kvm");
    let (mem, _memfd) = create_guest_memory(2 << 20).expect("memory");
    mem.write_slice(code, GuestAddress(CODE_AT)).expect("code");
    for (at, bytes) in data {
        mem.write_slice(bytes, GuestAddress(*at)).expect("data");
    }
    let left = mem.clone();
    let vm = create_vm(&kvm, &mem).expect("vm");
    install_kick_handler().expect("kick handler");
    let control = Arc::new(VcpuControl::new(kick_signal()));
    let value = Arc::new(Mutex::new(None));
    let mut pio = Bus::new();
    let done = Done {
        control: control.clone(),
        value: value.clone(),
    };
    pio.insert(Arc::new(Mutex::new(done)), DONE_PORT, 1)
        .expect("bus");
    let vcpu = Vcpu::new(&vm, 0, Arc::new(pio), Arc::new(Bus::new()), mem, control).expect("vcpu");
    vcpu.configure(&kvm, CpuProfile::detect(), 1)
        .expect("configure");
    vcpu.set_pvh_entry(CODE_AT).expect("entry");
    let (tx, rx) = channel();
    let handle = std::thread::spawn(move || vcpu.run(tx, || {}, || Ok(())));
    let (_, exit) = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the vCPU stops");
    handle.join().expect("join");
    let v = *value.lock().expect("lock");
    (exit, v, left)
}

#[test]
fn steps_over_fwait_and_popcnt_and_reaches_the_bus() {
    let code = [
        0x9b, // fwait
        0xb9, 0x0f, 0x0f, 0x00, 0x00, // mov ecx, 0x0f0f
        0xf3, 0x0f, 0xb8, 0xc1, // popcnt eax, ecx
        0xe6, 0xf4, // out 0xf4, al
        0xf4, // hlt
    ];
    let (exit, value) = run_code(&code);
    assert_eq!(exit, VcpuExit::Stopped);
    assert_eq!(value, Some(8), "popcnt(0x0f0f) reached the bus");
}

#[test]
fn an_instruction_nobody_can_run_stops_the_vcpu_clearly() {
    // xsaves [edi] with XSAVE off: the PVM emulator cannot run it and
    // husk-vmm runs only XSAVE and XRSTOR; hardware raises #UD, which
    // without an IDT ends in a triple fault.
    let code = [0x31, 0xff, 0x0f, 0xc7, 0x2f, 0xe6, 0xf4, 0xf4];
    let (exit, value) = run_code(&code);
    assert_eq!(value, None, "execution must not continue past it");
    match CpuProfile::detect() {
        CpuProfile::Emulated => match exit {
            VcpuExit::Error(msg) => {
                assert!(msg.contains("0f c7 2f"), "names the bytes: {msg}");
                assert!(msg.contains("RIP 0x1002"), "names the RIP: {msg}");
            }
            other => panic!("expected an error, got {other:?}"),
        },
        CpuProfile::Host => assert_eq!(exit, VcpuExit::Shutdown),
    }
}

/// Where the XSAVE tests keep their data.
const PATTERN_AT: u64 = 0x3000;
const ZEROS_AT: u64 = 0x3200;
const OUT_AT: u64 = 0x3100;
const AREA_AT: u64 = 0x4000;

/// Guest code: enable XSAVE (CR4.OSFXSR, OSXMMEXCPT, OSXSAVE; XCR0 = x87 |
/// SSE), load xmm0 from PATTERN_AT, XSAVE x87 and SSE to `area`, load
/// zeros into xmm0, XRSTOR from `area`, store xmm0 to OUT_AT, write 1 to
/// the done port.
fn xsave_round_trip_code(area: u32) -> Vec<u8> {
    let mut c = vec![
        0x0f, 0x20, 0xe0, // mov eax, cr4
        0x0d, 0x00, 0x06, 0x04, 0x00, // or eax, 0x40600
        0x0f, 0x22, 0xe0, // mov cr4, eax
        0x31, 0xc9, // xor ecx, ecx
        0x31, 0xd2, // xor edx, edx
        0xb8, 0x03, 0x00, 0x00, 0x00, // mov eax, 3
        0x0f, 0x01, 0xd1, // xsetbv
        0xf3, 0x0f, 0x6f, 0x05, 0x00, 0x30, 0x00, 0x00, // movdqu xmm0, [0x3000]
        0xbf, // mov edi, area
    ];
    c.extend(area.to_le_bytes());
    c.extend([
        0x0f, 0xae, 0x27, // xsave [edi]
        0xf3, 0x0f, 0x6f, 0x05, 0x00, 0x32, 0x00, 0x00, // movdqu xmm0, [0x3200]
        0x0f, 0xae, 0x2f, // xrstor [edi]
        0xf3, 0x0f, 0x7f, 0x05, 0x00, 0x31, 0x00, 0x00, // movdqu [0x3100], xmm0
        0xb0, 0x01, // mov al, 1
        0xe6, 0xf4, // out 0xf4, al
        0xf4, // hlt
    ]);
    c
}

/// XSAVE and XRSTOR move the guest's SSE state through memory: on a PVM
/// host husk-vmm executes both (arch/xsave.rs), on hardware the CPU does;
/// the guest sees the same either way.
#[test]
fn xsave_and_xrstor_move_the_guest_state() {
    let pattern: Vec<u8> = (0..16u8).map(|i| 0xa0 ^ i).collect();
    let code = xsave_round_trip_code(u32::try_from(AREA_AT).expect("address"));
    // A zeroed area as an OS prepares one (XRSTOR faults on a header with
    // stray bits), with a marker in the bytes XSAVE must leave alone.
    let mut area = vec![0u8; 1024];
    area[416..512].fill(0xee);
    let (exit, value, mem) = run_code_with(
        &code,
        &[
            (PATTERN_AT, &pattern),
            (ZEROS_AT, &[0u8; 16]),
            (AREA_AT, &area),
        ],
    );
    assert_eq!((exit, value), (VcpuExit::Stopped, Some(1)));
    let mut out = [0u8; 16];
    mem.read_slice(&mut out, GuestAddress(OUT_AT)).expect("out");
    assert_eq!(out.to_vec(), pattern, "xmm0 came back through XRSTOR");
    let mut area = [0u8; 576];
    mem.read_slice(&mut area, GuestAddress(AREA_AT))
        .expect("area");
    assert_eq!(area[160..176].to_vec(), pattern, "XSAVE stored xmm0");
    // SSE is in use (xmm0 holds the pattern); x87 may be in its initial
    // state, which XSTATE_BV then leaves clear.
    assert_eq!(area[512] & 2, 2, "XSTATE_BV names SSE");
    assert!(
        area[416..512].iter().all(|&b| b == 0xee),
        "the available bytes untouched"
    );
}

/// A misaligned save area faults (#GP, which without an IDT ends the VM
/// in a triple fault) instead of being written, as on hardware.
#[test]
fn xsave_to_a_misaligned_area_faults() {
    let code = xsave_round_trip_code(u32::try_from(AREA_AT + 8).expect("address"));
    let (exit, value, mem) = run_code_with(&code, &[(AREA_AT, &[0xee; 1024])]);
    assert_eq!((exit, value), (VcpuExit::Shutdown, None));
    let mut area = [0u8; 1024];
    mem.read_slice(&mut area, GuestAddress(AREA_AT))
        .expect("area");
    assert!(area.iter().all(|&b| b == 0xee), "nothing written");
}

/// XRSTOR before the guest enabled XSAVE (CR4.OSXSAVE) is #UD, as on
/// hardware.
#[test]
fn xrstor_before_xsave_is_enabled_is_undefined() {
    // xor edi, edi; xrstor [edi]; out 0xf4, al; hlt
    let code = [0x31, 0xff, 0x0f, 0xae, 0x2f, 0xe6, 0xf4, 0xf4];
    let (exit, value) = run_code(&code);
    assert_eq!((exit, value), (VcpuExit::Shutdown, None));
}

#[test]
fn a_spinning_guest_pauses_resumes_and_stops() {
    require_kvm();
    let kvm = open_kvm(std::path::Path::new("/dev/kvm")).expect("kvm");
    let (mem, _memfd) = create_guest_memory(2 << 20).expect("memory");
    // inc eax; jmp back: never exits on its own.
    mem.write_slice(&[0x40, 0xeb, 0xfd], GuestAddress(CODE_AT))
        .expect("code");
    let vm = create_vm(&kvm, &mem).expect("vm");
    install_kick_handler().expect("kick handler");
    let control = Arc::new(VcpuControl::new(kick_signal()));
    let vcpu = Vcpu::new(
        &vm,
        0,
        Arc::new(Bus::new()),
        Arc::new(Bus::new()),
        mem,
        control.clone(),
    )
    .expect("vcpu");
    vcpu.configure(&kvm, CpuProfile::detect(), 1)
        .expect("configure");
    vcpu.set_pvh_entry(CODE_AT).expect("entry");
    let (tx, rx) = channel();
    let handle = std::thread::spawn(move || vcpu.run(tx, || {}, || Ok(())));
    assert!(control.wait_for(RunState::Running, Duration::from_secs(10)));
    for _ in 0..3 {
        control.request(Wanted::Pause);
        assert!(
            control.wait_for(RunState::Paused, Duration::from_secs(10)),
            "pauses"
        );
        control.request(Wanted::Run);
        assert!(
            control.wait_for(RunState::Running, Duration::from_secs(10)),
            "resumes"
        );
    }
    control.request(Wanted::Stop);
    let (_, exit) = rx.recv_timeout(Duration::from_secs(10)).expect("stops");
    assert_eq!(exit, VcpuExit::Stopped);
    handle.join().expect("join");
    assert_eq!(control.state(), RunState::Exited);
}

/// Records every byte written to the done port and asks the vCPU to pause
/// after the first one.
struct PauseOnWrite {
    control: Arc<VcpuControl>,
    values: Arc<Mutex<Vec<u8>>>,
}

impl BusDevice for PauseOnWrite {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        self.values.lock().expect("lock").extend_from_slice(data);
        self.control.request(Wanted::Pause);
    }
}

/// The snapshot round trip at the KVM level: run a guest to a point, pause,
/// save vCPU and VM state and memory, restore all of it into a brand-new VM,
/// and the guest carries on from the next instruction.
#[test]
fn vcpu_and_vm_state_round_trip_into_a_new_vm() {
    use husk_vmm_core::vstate::vm::{restore_vm_state, save_vm_state};
    require_kvm();
    install_kick_handler().expect("kick handler");
    let kvm = Arc::new(open_kvm(std::path::Path::new("/dev/kvm")).expect("kvm"));
    let code = [
        0xb8, 0x34, 0x00, 0x00, 0x00, // mov eax, 0x34
        0xe6, 0xf4, // out 0xf4, al      (VM 1 pauses here)
        0x40, // inc eax
        0xe6, 0xf4, // out 0xf4, al      (VM 2 reports 0x35)
        0xf4, // hlt
    ];

    // VM 1: run to the first port write, then save everything.
    let (mem1, _fd1) = create_guest_memory(2 << 20).expect("memory");
    mem1.write_slice(&code, GuestAddress(CODE_AT))
        .expect("code");
    let vm1 = create_vm(&kvm, &mem1).expect("vm");
    let control1 = Arc::new(VcpuControl::new(kick_signal()));
    let values1 = Arc::new(Mutex::new(Vec::new()));
    let mut pio = Bus::new();
    let dev = PauseOnWrite {
        control: control1.clone(),
        values: values1.clone(),
    };
    pio.insert(Arc::new(Mutex::new(dev)), DONE_PORT, 1)
        .expect("bus");
    let vcpu1 = Vcpu::new(
        &vm1,
        0,
        Arc::new(pio),
        Arc::new(Bus::new()),
        mem1.clone(),
        control1.clone(),
    )
    .expect("vcpu");
    vcpu1
        .configure(&kvm, CpuProfile::detect(), 1)
        .expect("configure");
    vcpu1.set_pvh_entry(CODE_AT).expect("entry");
    let (tx1, rx1) = channel();
    let t1 = std::thread::spawn(move || vcpu1.run(tx1, || {}, || Ok(())));
    assert!(
        control1.wait_for(RunState::Paused, Duration::from_secs(30)),
        "VM 1 pauses at the port write"
    );
    assert_eq!(*values1.lock().expect("lock"), vec![0x34]);

    let (state_tx, state_rx) = channel();
    let k = kvm.clone();
    assert!(control1.post(Box::new(move |vcpu: &mut Vcpu| {
        let saved = vcpu
            .msrs_to_save(&k)
            .map_err(|e| e.to_string())
            .and_then(|msrs| vcpu.save_state(&msrs).map_err(|e| e.to_string()));
        let _ = state_tx.send(saved);
    })));
    let state = state_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("job ran")
        .expect("vCPU state");
    let vm_state = save_vm_state(&vm1).expect("VM state");
    let mut image = vec![0u8; 2 << 20];
    mem1.read_slice(&mut image, GuestAddress(0))
        .expect("memory image");
    control1.request(Wanted::Stop);
    assert_eq!(
        rx1.recv_timeout(Duration::from_secs(10))
            .expect("VM 1 stops")
            .1,
        VcpuExit::Stopped
    );
    t1.join().expect("join");

    // VM 2: fresh KVM objects, restored state, same memory contents.
    let (mem2, _fd2) = create_guest_memory(2 << 20).expect("memory");
    mem2.write_slice(&image, GuestAddress(0))
        .expect("memory image");
    let vm2 = create_vm(&kvm, &mem2).expect("vm");
    restore_vm_state(&vm2, &vm_state).expect("restore VM state");
    let control2 = Arc::new(VcpuControl::new(kick_signal()));
    let value2 = Arc::new(Mutex::new(None));
    let mut pio = Bus::new();
    pio.insert(
        Arc::new(Mutex::new(Done {
            control: control2.clone(),
            value: value2.clone(),
        })),
        DONE_PORT,
        1,
    )
    .expect("bus");
    let vcpu2 =
        Vcpu::new(&vm2, 0, Arc::new(pio), Arc::new(Bus::new()), mem2, control2).expect("vcpu");
    vcpu2.restore_state(&state).expect("restore vCPU state");
    let (tx2, rx2) = channel();
    let t2 = std::thread::spawn(move || vcpu2.run(tx2, || {}, || Ok(())));
    assert_eq!(
        rx2.recv_timeout(Duration::from_secs(30))
            .expect("VM 2 stops")
            .1,
        VcpuExit::Stopped
    );
    t2.join().expect("join");
    assert_eq!(
        *value2.lock().expect("lock"),
        Some(0x35),
        "VM 2 continued after the saved instruction"
    );
}
