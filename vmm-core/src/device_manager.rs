//! The devices of one VM: which exist (from the configuration), where
//! each sits (port I/O ports, virtio-mmio windows and IRQ lines), how the
//! guest learns of them (kernel command line words) and what each adds to
//! the VMM's event loop.
//!
//! [`attach_all`] is step 4 of [`crate::vmm::Vmm::build_with`]: it makes
//! every device the configuration names, in a fixed order (serial console,
//! reset line, then the virtio devices vsock, fs, net, balloon), so the
//! same configuration always gives the same layout, which snapshots and
//! templates rely on (the snapshot fingerprint hashes the device types in
//! slot order).

use std::{
    fs::File,
    sync::{Arc, Mutex},
};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::{
    arch::layout::{
        I8042_PORT, SERIAL_IRQ, SERIAL_PORT, VIRTIO_IRQ_START, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
    },
    bus::Bus,
    config::VmConfig,
    devices::{
        legacy::{EventFdTrigger, ResetLine, SerialConsole},
        virtio::{
            balloon::{Balloon, BalloonControl},
            fs::{FsBackend, VhostUserFs},
            mmio::MmioTransport,
            net::{
                tap::{FrameBackend, Tap},
                Net,
            },
            vsock::{muxer::Muxer, Vsock},
            Interrupt, VirtioDevice,
        },
    },
    memory::GuestMemory,
    vmm::{device_err, Subscriber, VmmError},
};

/// Connections to device backends (daemons, the tap) that a VM's devices
/// use. They are made before the VM is built and outlive a failed build, so
/// a VM whose snapshot is refused can boot cold on the same daemons (each
/// serves a single connection) and the same tap (an inherited descriptor
/// can be taken over only once).
#[derive(Debug, Default)]
pub struct Backends {
    fs: Option<FsBackend>,
    tap: Option<Tap>,
}

impl Backends {
    /// Connects to every backend `config` names.
    pub fn connect(config: &VmConfig) -> Result<Self, VmmError> {
        let fs = match &config.fs {
            Some(fs_cfg) => Some(
                FsBackend::connect(&fs_cfg.socket).map_err(device_err("the virtio-fs device"))?,
            ),
            None => None,
        };
        let tap = match config.net.as_ref().and_then(|n| n.tap.as_ref()) {
            None => None,
            // SAFETY: the fd was handed to this process to own (the command
            // line's fd=); nothing else in it uses the number, and
            // validation refused 0-2.
            Some(crate::TapSource::Fd(fd)) => Some(unsafe { Tap::from_raw_fd(*fd) }),
            Some(crate::TapSource::Name(name)) => Some(Tap::open(name)),
        }
        .transpose()
        .map_err(device_err("the network device's tap"))?;
        Ok(Self { fs, tap })
    }
}

/// The devices [`attach_all`] made.
#[derive(Debug)]
pub struct Devices {
    /// The port I/O bus (serial console, reset line).
    pub pio: Bus,
    /// The MMIO bus (virtio-mmio windows).
    pub mmio: Bus,
    /// The virtio transports in slot order (snapshots walk them).
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// Kernel command line words that describe the devices.
    pub cmdline: Vec<String>,
    /// Signalled when the guest pulls the i8042 reset line.
    pub reset_evt: EventFd,
    /// The balloon's handle, if the VM has one.
    pub balloon: Option<BalloonControl>,
}

/// Makes every device `config` names on `vm`, wires their interrupts and
/// queue notifications, and registers their event handlers with
/// `event_manager`.
pub fn attach_all(
    config: &VmConfig,
    vm: &VmFd,
    mem: &GuestMemory,
    backends: &Backends,
    event_manager: &mut EventManager<Subscriber>,
) -> Result<Devices, VmmError> {
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let mut cmdline = Vec::new();
    attach_serial(config, vm, &mut pio, &mut cmdline)?;
    let reset_evt = attach_reset_line(&mut pio)?;

    let mut virtio = VirtioSlots {
        vm,
        mem,
        mmio: &mut mmio,
        cmdline: &mut cmdline,
        event_manager,
        next_addr: VIRTIO_MMIO_START,
        next_irq: VIRTIO_IRQ_START,
        transports: Vec::new(),
    };
    if let Some(vsock_cfg) = &config.vsock {
        let what = "the vsock device";
        let muxer = Muxer::new(vsock_cfg.guest_cid, &vsock_cfg.uds_path)
            .map_err(device_err("the vsock socket"))?;
        let vsock = Vsock::new(vsock_cfg.guest_cid, muxer).map_err(device_err(what))?;
        let handler = vsock.handler().map_err(device_err(what))?;
        virtio.attach(Box::new(vsock), handler, what)?;
    }
    if let Some(fs_cfg) = &config.fs {
        let what = "the virtio-fs device";
        let backend = backends
            .fs
            .as_ref()
            .ok_or_else(|| VmmError::Device(what, "no connection to its daemon was made".into()))?;
        let fs = VhostUserFs::new(backend, &fs_cfg.tag).map_err(device_err(what))?;
        let handler = fs.handler().map_err(device_err(what))?;
        virtio.attach(Box::new(fs), handler, what)?;
    }
    if let Some(net_cfg) = &config.net {
        let what = "the network device";
        let backend = backends
            .tap
            .as_ref()
            .map(Tap::try_clone)
            .transpose()
            .map_err(device_err("the network device's tap"))?
            .map(|t| Box::new(t) as Box<dyn FrameBackend>);
        let net = Net::new(net_cfg.mac, net_cfg.mtu, backend).map_err(device_err(what))?;
        let handler = net.handler().map_err(device_err(what))?;
        virtio.attach(Box::new(net), handler, what)?;
    }
    let mut balloon_control = None;
    if let Some(balloon_cfg) = &config.balloon {
        let what = "the balloon device";
        let balloon = Balloon::new(*balloon_cfg, config.mem_mib << 20).map_err(device_err(what))?;
        let handler = balloon.handler().map_err(device_err(what))?;
        balloon_control = Some(balloon.control());
        virtio.attach(Box::new(balloon), handler, what)?;
        if balloon_cfg.free_page_reporting {
            virtio.cmdline.push(format!(
                "page_reporting.page_reporting_order={}",
                balloon_cfg.reporting_order
            ));
        }
    }
    let transports = virtio.transports;
    Ok(Devices {
        pio,
        mmio,
        transports,
        cmdline,
        reset_evt,
        balloon: balloon_control,
    })
}

/// The serial console on COM1, if asked for (every byte is a VM exit, so
/// it is off by default); without it the guest does not even probe a UART.
fn attach_serial(
    config: &VmConfig,
    vm: &VmFd,
    pio: &mut Bus,
    cmdline: &mut Vec<String>,
) -> Result<(), VmmError> {
    let Some(path) = &config.serial_log else {
        cmdline.push("8250.nr_uarts=0".to_string());
        return Ok(());
    };
    let out = File::create(path).map_err(device_err("the serial console log"))?;
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(device_err("the serial console"))?;
    vm.register_irqfd(&irq, SERIAL_IRQ)
        .map_err(device_err("the serial console interrupt"))?;
    let serial = SerialConsole::new(EventFdTrigger(irq), out);
    pio.insert(Arc::new(Mutex::new(serial)), u64::from(SERIAL_PORT), 8)
        .map_err(device_err("the serial console"))?;
    cmdline.push("console=ttyS0".to_string());
    cmdline.push("8250.nr_uarts=1".to_string());
    Ok(())
}

/// The i8042 reset line (how husk's guest powers off); returns the eventfd
/// it signals.
fn attach_reset_line(pio: &mut Bus) -> Result<EventFd, VmmError> {
    let what = "the reset line";
    let reset_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(device_err(what))?;
    let reset_line = ResetLine::new(EventFdTrigger(
        reset_evt.try_clone().map_err(device_err(what))?,
    ));
    pio.insert(Arc::new(Mutex::new(reset_line)), u64::from(I8042_PORT), 5)
        .map_err(device_err(what))?;
    Ok(reset_evt)
}

/// Where the next virtio-mmio device goes, and the devices placed so far.
struct VirtioSlots<'a> {
    vm: &'a VmFd,
    mem: &'a GuestMemory,
    mmio: &'a mut Bus,
    cmdline: &'a mut Vec<String>,
    event_manager: &'a mut EventManager<Subscriber>,
    next_addr: u64,
    next_irq: u32,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl VirtioSlots<'_> {
    /// Puts `device` in the next MMIO window with the next IRQ: its
    /// interrupt becomes an irqfd, its queue notifications KVM ioeventfds,
    /// its `handler` joins the event loop and its `virtio_mmio.device=` word
    /// goes on the command line.
    fn attach<H: MutEventSubscriber + Send + 'static>(
        &mut self,
        device: Box<dyn VirtioDevice>,
        handler: H,
        what: &'static str,
    ) -> Result<(), VmmError> {
        let (addr, irq_line) = (self.next_addr, self.next_irq);
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(device_err(what))?;
        self.vm
            .register_irqfd(&irq, irq_line)
            .map_err(device_err(what))?;
        let transport = MmioTransport::new(self.mem.clone(), device, Interrupt::new(Box::new(irq)))
            .map_err(device_err(what))?;
        for (i, evt) in transport.queue_evts().iter().enumerate() {
            let datamatch = u32::try_from(i).unwrap_or(u32::MAX);
            self.vm
                .register_ioevent(evt, &IoEventAddress::Mmio(addr + 0x50), datamatch)
                .map_err(device_err(what))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.transports.push(transport.clone());
        self.mmio
            .insert(transport, addr, VIRTIO_MMIO_SIZE)
            .map_err(device_err(what))?;
        self.next_addr += VIRTIO_MMIO_SIZE;
        self.next_irq += 1;
        self.cmdline
            .push(format!("virtio_mmio.device=4K@{addr:#x}:{irq_line}"));
        self.event_manager
            .add_subscriber(Arc::new(Mutex::new(handler)));
        Ok(())
    }
}
